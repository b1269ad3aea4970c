"""The gRPC server: the typed ``xai_serve.v1`` API, the Open Inference Protocol, cross-request
batching, request codecs, limits and auth.
"""
