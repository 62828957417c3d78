"""Engines that implement the policy/value protocols in-process (library mode).

Importing this package does not import vLLM; constructing an engine does.
"""

from cpl.engines.vllm_offline import MicroBatcher, PromptTooLongError, VLLMPolicy, VLLMValue

__all__ = ["MicroBatcher", "PromptTooLongError", "VLLMPolicy", "VLLMValue"]
