"""Generated gRPC code of the gateway's contract, package `ctjoint.v1` (see scan.proto).

Regenerate with `make proto`; tests/test_gateway_proto.py fails when these files are stale.
"""
