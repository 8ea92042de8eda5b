"""A long-lived ClientApp process for one SuperNode (§14), for `flower-supernode --isolation process`.

With Flower 1.42's default isolation (`subprocess`) a SuperNode's SuperExec starts a fresh `flwr-clientapp`
process for every message: it imports flwr, torch and f3crec, rebuilds the node from `Context.state` and
reads the node's block data again — seconds per message (f3crec/README.md, "Three ways to run it").
`--isolation process` lets another process serve the SuperNode's tasks; this one does, for its whole life:

    python -m f3crec.flower.executor --runtime-api-address 127.0.0.1:<supernode --port> --parent-pid <supernode>

It does per task what `flwr-clientapp` does (pull the message, context and FAB with the task's token, run
the ClientApp, push the reply and the new context), through the same Flower functions, but imports the
ClientApp once and keeps it; client_app.py then reuses its live Node while its version matches
`Context.state`, so the state still round-trips through the SuperNode after every message and a
restarted executor continues from it. It serves only the FAB whose `clientapp` component is this
repository's (app/pyproject.toml); a task of another app gets an error reply.

These are non-public parts of Flower (supernode.runtime.run_clientapp, supercore.runtime): the `fl` extra
pins the minor version.
"""
from __future__ import annotations

import argparse
import importlib
import io
import sys
import time
import tomllib
import zipfile
from functools import partial

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime import run_clientapp
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

APP_REF = "f3crec.flower.client_app:app"

# A task is handed out as soon as the SuperNode holds the message's metadata, often before it has fetched
# the message's objects from the SuperLink; Flower then retries the pull after 1 s, 2 s, ... (up to 10 s).
# The same pull here retries after 0.02 s, doubling up to 0.2 s.
run_clientapp.pull_and_inflate_object_from_tree = partial(run_clientapp.pull_and_inflate_object_from_tree,
                                                          initial_backoff=0.02, backoff_cap=0.2)


def _client(address: str, component: str, token: str | None = None) -> RuntimeHttpClient:
    interceptors = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=interceptors,
                                                 retry_invoker=make_simple_http_retry_invoker())


def _load(ref: str):
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


class Executor:
    """Serves the ClientApp tasks of one SuperNode's Runtime API, one at a time (as a SuperNode sends them)."""

    def __init__(self, address: str, poll: float = 0.01):
        self.address, self.poll = address, poll
        self.app = _load(APP_REF)
        self.fabs: dict[str, str] = {}      # FAB hash -> its clientapp component
        self.tasks = 0

    def _component(self, fab) -> str:
        if fab.hash_str not in self.fabs:
            with zipfile.ZipFile(io.BytesIO(fab.content)) as bundle:
                project = tomllib.loads(bundle.read("pyproject.toml").decode())
            self.fabs[fab.hash_str] = project["tool"]["flwr"]["app"]["components"]["clientapp"]
        return self.fabs[fab.hash_str]

    def run_task(self, token: str) -> None:
        client = _client(self.address, "flwr-clientapp", token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message = context = reply = None
        status, details = SubStatus.FAILED, "ClientApp task failed"
        started = time.perf_counter()
        times = {}
        try:
            message, context, _run, fab = pull_task_input(client)
            times["pull"] = time.perf_counter() - started
            component = self._component(fab)
            if component != APP_REF:
                raise RuntimeError(f"this executor serves {APP_REF}, the run's app is {component}")
            reply = self.app(message=message, context=context)
            times["app"] = time.perf_counter() - started - times["pull"]
            status, details = SubStatus.COMPLETED, ""
        except Exception as err:  # noqa: BLE001 — a failed task is an error reply, as flwr-clientapp sends
            details = f"{type(err)}:<'{err}'>"
            print(f"[f3crec executor] task failed: {details}", file=sys.stderr, flush=True)
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
                push_task_output(client, context, status, details)
                times["total"] = time.perf_counter() - started
                print(f"[f3crec executor] {time.time():.3f} {message.metadata.message_type if message else '?'} "
                      + " ".join(f"{k}={v:.3f}" for k, v in times.items()), file=sys.stderr, flush=True)
            finally:
                heartbeat.stop()
                client.close()
        self.tasks += 1

    def serve(self) -> None:
        acquire = _client(self.address, "SuperExec")
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
        while True:
            response = acquire.AcquireTask(request)
            if response.HasField("task") and response.token:
                self.run_task(response.token)
            else:
                time.sleep(self.poll)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, host:port")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) ends")
    parser.add_argument("--poll", type=float, default=0.01, help="seconds between task polls when idle")
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)   # SIGINT to this process when the SuperNode is gone
    try:
        Executor(args.runtime_api_address, args.poll).serve()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
