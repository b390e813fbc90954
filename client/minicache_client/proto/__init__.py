"""Generated gRPC stubs of protos/ (do not edit: run `bash protos/generate.sh`)."""
