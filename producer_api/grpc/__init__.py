"""The API over gRPC: the Open Inference Protocol's ``GRPCInferenceService`` (KServe v2, wire-compatible with
``tritonclient.grpc``), the fleet's own async ``JobService`` and the standard health service, on one ``grpc.aio``
server in the API process (:mod:`producer_api.grpc.server`), sharing its Redis clients, keys and rate limits."""
