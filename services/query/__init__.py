"""The gRPC query service ("find similar cases"; also the embedded index's owner) and its client."""
