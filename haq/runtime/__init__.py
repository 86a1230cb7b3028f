"""The CPU-GPU MoE runtime: traces, hardware profiles, the expert cache, the cost predictor, placement."""
