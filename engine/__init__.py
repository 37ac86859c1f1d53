"""deltaserve.engine: Llama-family backbone with per-row tenant deltas, paged KV cache, continuous batching."""
from deltaserve.engine.config import EngineConfig, SamplingParams
from deltaserve.engine.outputs import EngineStats, RequestOutput, TokenLogprob, TopLogprob

__all__ = ["EngineConfig", "SamplingParams", "EngineStats", "RequestOutput", "TokenLogprob", "TopLogprob"]
