"""A CPU test double of vLLM's offline API (see ../README.md): greedy decoding on a `transformers` model."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

__version__ = "0.34.0"
ENGINES: list["LLM"] = []  # every engine built in this process, for the tests


def TokensPrompt(**fields):  # a TypedDict in vLLM
    return dict(fields)


class SamplingParams:
    def __init__(self, temperature=1.0, max_tokens=16, stop=None, prompt_logprobs=None, detokenize=True, **extra):
        self.temperature, self.max_tokens, self.stop = temperature, max_tokens, stop
        self.prompt_logprobs, self.detokenize, self.extra = prompt_logprobs, detokenize, extra


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None


class _EngineModel:
    """What `apply_model` hands to a function: the model's `load_weights` and `named_parameters`."""

    def __init__(self, model):
        self.model = model

    def named_parameters(self):
        return self.model.named_parameters()

    def load_weights(self, weights):
        own = dict(self.model.named_parameters())
        loaded = set()
        with torch.no_grad():
            for name, tensor in weights:
                if name in own:
                    own[name].copy_(tensor.to(own[name].dtype))
                    loaded.add(name)
        return loaded


class LLM:
    def __init__(self, model: str, dtype="auto", seed=0, max_model_len=None, hf_overrides=None, load_format="auto",
                 trust_remote_code=False, **kwargs):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.kwargs = dict(kwargs, model=model, dtype=dtype, seed=seed, hf_overrides=hf_overrides,
                           load_format=load_format)
        torch_dtype = torch.float32 if dtype == "auto" else getattr(torch, dtype)
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        for key, value in (hf_overrides or {}).items():
            setattr(config, key, value)
        if load_format == "dummy":
            torch.manual_seed(seed)
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(model, config=config, dtype=torch_dtype)
        self.model.eval()
        self.prefix_cache_resets = 0
        max_len = max_model_len or getattr(config, "max_position_embeddings", 2048)
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=max_len))
        ENGINES.append(self)

    def apply_model(self, func):
        return [func(_EngineModel(self.model))]

    def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False):
        self.prefix_cache_resets += 1
        return True

    @torch.no_grad()
    def generate(self, prompts, sampling_params=None, use_tqdm=False, lora_request=None):
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        return [self._one(prompt["prompt_token_ids"], p) for prompt, p in zip(prompts, params)]

    def _one(self, tokens, params):
        logits = self.model(torch.tensor([tokens])).logits[0].float()
        prompt_logprobs = None
        if params.prompt_logprobs:
            logprobs = torch.log_softmax(logits, dim=-1)
            prompt_logprobs = [None]
            for position in range(1, len(tokens)):
                row = logprobs[position - 1]
                top = int(row.argmax())
                prompt_logprobs.append({tokens[position]: Logprob(float(row[tokens[position]])),
                                        top: Logprob(float(row[top]), 1)})
        generated = self._greedy(tokens, logits[-1], params) if params.max_tokens else []
        text = self._tokenizer().decode(generated) if generated else ""
        for stop in ([params.stop] if isinstance(params.stop, str) else params.stop or []):
            if stop and stop in text:
                text = text[:text.index(stop)]
        return SimpleNamespace(prompt_token_ids=tokens, prompt_logprobs=prompt_logprobs,
                               outputs=[SimpleNamespace(text=text, token_ids=generated)])

    def _greedy(self, tokens, last_logits, params):
        stops = [params.stop] if isinstance(params.stop, str) else [s for s in params.stop or [] if s]
        eos = self.model.config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        generated = []
        sequence = list(tokens)
        logits = last_logits
        while len(generated) < params.max_tokens:
            token = int(logits.argmax())
            if token in eos:
                break
            generated.append(token)
            sequence.append(token)
            if stops and any(stop in self._tokenizer().decode(generated) for stop in stops):
                break
            logits = self.model(torch.tensor([sequence])).logits[0, -1].float()
        return generated

    def _tokenizer(self):
        if not hasattr(self, "_tok"):
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.kwargs["model"])
        return self._tok
