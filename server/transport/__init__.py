"""Transports: mnist.v1 and the Open Inference Protocol over gRPC, /v2 over HTTP and the web page, health; the
guards every method passes, the wire fast paths. They translate; the data plane decides."""
