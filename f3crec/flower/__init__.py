"""F3CRec on Flower (§14, optional extra `flwr`): a ClientApp per node hosting a shard of users, a ServerApp
that drives train.fit through `FlowerSimulator`, an in-process grid, Flower's simulation runtime (Ray, extra
`fl-sim`) and a local deployment.

    python -m f3crec.main --config f3crec/configs/smoke.yaml federation.simulator=flower   # in-process grid
    python -m f3crec.flower.deploy --nodes 4 --config f3crec/configs/smoke.yaml            # SuperLink + 4 SuperNodes
    python -m f3crec.flower.simulate --nodes 4 --config f3crec/configs/smoke.yaml          # 4 virtual nodes on Ray

Only this package imports flwr (tests/test_isolation.py); `node.py` (the client side) and `wire.py` do not
need it for their logic, `simulator.py` is the server side and reaches clients only through a Grid.
"""
