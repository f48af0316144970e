"""The Open Inference Protocol over gRPC (Triton's GRPCInferenceService), an asyncio server of its own."""
