"""F3CRec on Flower (§14, extra `fl`): a Flower App (app/pyproject.toml) whose ClientApp hosts a shard of users
per SuperNode and whose ServerApp drives train.fit through `FlowerSimulator`; Flower's public App API only.

    python -m f3crec.main --config f3crec/configs/smoke.yaml federation.simulator=flower   # in-process grid
    make f3crec-deploy DATA=smoke NODES=4     # stock SuperLink + 4 SuperNodes, TLS + node auth (common/flower_ops.py)
    make f3crec-sim DATA=smoke NODES=4        # Flower's simulation runtime (extra fl-sim)

Only this package imports flwr (tests/common/test_isolation.py); `node.py` (the client side) does not need it for its
logic, `simulator.py` is the server side and reaches clients only through a Grid.
"""
