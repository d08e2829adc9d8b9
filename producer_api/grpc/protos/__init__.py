"""The fleet's own protobuf service (``jobs.proto``) and its generated modules.

``jobs_pb2*.py`` are generated from ``jobs.proto`` by ``python -m producer_api.grpc.codegen`` (grpcio-tools); never
edit them by hand. A unit test regenerates them and checks that they match. The KServe v2 service comes as the
generated modules that ``tritonclient`` ships (``tritonclient.grpc.service_pb2``).
"""
