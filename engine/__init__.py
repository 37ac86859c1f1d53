"""deltaserve.engine: Llama-family backbone with per-row tenant deltas, paged KV cache, continuous batching."""
from deltaserve.engine.async_engine import AsyncEngine, EngineDeadError
from deltaserve.engine.config import EngineConfig, SamplingParams
from deltaserve.engine.llm_engine import LLMEngine
from deltaserve.engine.outputs import EngineStats, RequestOutput, TokenLogprob, TopLogprob

__all__ = ["AsyncEngine", "EngineDeadError", "LLMEngine", "EngineConfig", "SamplingParams", "EngineStats",
           "RequestOutput", "TokenLogprob", "TopLogprob"]
