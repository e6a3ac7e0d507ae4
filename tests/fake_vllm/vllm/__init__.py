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
        tokens = [list(prompt["prompt_token_ids"]) for prompt in prompts]
        # Prompts of one length with the same parameters run as one batch (no padding, so nothing is masked).
        groups: dict = {}
        for index, (sequence, p) in enumerate(zip(tokens, params)):
            key = (len(sequence), p.max_tokens, tuple(self._stops(p)), p.prompt_logprobs, p.temperature)
            groups.setdefault(key, []).append(index)
        results = [None] * len(prompts)
        for indices in groups.values():
            for index, result in zip(indices, self._batch([tokens[i] for i in indices], params[indices[0]])):
                results[index] = result
        return results

    def _batch(self, batch, params):
        output = self.model(torch.tensor(batch), use_cache=True)
        logits = output.logits.float()
        results = []
        generated = self._greedy(logits[:, -1], output.past_key_values, params) if params.max_tokens else \
            [[] for _ in batch]
        for row, tokens in enumerate(batch):
            prompt_logprobs = None
            if params.prompt_logprobs:
                logprobs = torch.log_softmax(logits[row], dim=-1)
                prompt_logprobs = [None]
                for position in range(1, len(tokens)):
                    step = logprobs[position - 1]
                    top = int(step.argmax())
                    prompt_logprobs.append({tokens[position]: Logprob(float(step[tokens[position]])),
                                            top: Logprob(float(step[top]), 1)})
            text = self._tokenizer().decode(generated[row]) if generated[row] else ""
            for stop in self._stops(params):
                if stop in text:
                    text = text[:text.index(stop)]
            results.append(SimpleNamespace(prompt_token_ids=tokens, prompt_logprobs=prompt_logprobs,
                                           outputs=[SimpleNamespace(text=text, token_ids=generated[row])]))
        return results

    @staticmethod
    def _stops(params) -> list[str]:
        return [params.stop] if isinstance(params.stop, str) else [s for s in params.stop or [] if s]

    def _greedy(self, logits, past, params):
        """Greedy decoding of a batch with the key/value cache; a row stops at EOS, a stop string or max_tokens."""
        stops = self._stops(params)
        eos = self.model.config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        rows = logits.shape[0]
        generated = [[] for _ in range(rows)]
        done = [False] * rows
        for _ in range(params.max_tokens):
            tokens = logits.argmax(dim=-1).tolist()
            for row, token in enumerate(tokens):
                if done[row]:
                    continue
                if token in eos:
                    done[row] = True
                    continue
                generated[row].append(token)
                if stops and any(stop in self._tokenizer().decode(generated[row]) for stop in stops):
                    done[row] = True
            if all(done):
                break
            output = self.model(torch.tensor(tokens).unsqueeze(1), past_key_values=past, use_cache=True)
            logits, past = output.logits[:, -1].float(), output.past_key_values
        return generated

    def _tokenizer(self):
        if not hasattr(self, "_tok"):
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.kwargs["model"])
        return self._tok
