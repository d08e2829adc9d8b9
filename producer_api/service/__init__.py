"""What the API does, whatever the transport: REST routes and gRPC services decode, call these, and encode."""
