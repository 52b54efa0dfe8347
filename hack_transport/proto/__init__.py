"""Generated gRPC/protobuf stubs of the .proto files in proto/ (do not edit; regenerate)."""
