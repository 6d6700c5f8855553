"""The text encoder: T5 v1.1 XXL (encoder only) and its tokenizer, as Open-Sora 1.2 runs them.

Upstream (``opensora/models/text_encoder/t5.py``, ``T5Encoder``) loads ``DeepFloyd/t5-v1_1-xxl`` with
``AutoTokenizer`` and ``T5EncoderModel``, tokenizes to exactly 300 tokens and returns
``y=[n, 1, 300, 4096]`` with ``mask=[n, 300]``. Inference builds it without a dtype, so T5 runs in fp32.

The real vocabulary (``spiece.model``) cannot be fetched here. ``load_tokenizer`` uses it when it is on
disk and otherwise falls back to a committed stand-in (``data/tokenizers/t5-standin``): a small Unigram
vocabulary trained on the shipped prompts. Its ids differ from upstream's; the length, padding, EOS and
mask rules are the same, and ``tokenizer.is_standin`` says which one is in use.

Regenerate the stand-in (once; the result is committed): ``python -m utils.model.text_encoder``.
"""
from __future__ import annotations

import string
import warnings
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel, T5Tokenizer

from utils.model.captions import append_score_to_prompts, text_preprocessing
from utils.model.weights import materialize_random
from utils.paths import DATA, PROMPTS

MODEL_MAX_LENGTH = 300  # text_encoder.model_max_length in configs/opensora-v1-2/inference/sample.py

T5_TOKENIZER_REPO = "DeepFloyd/t5-v1_1-xxl"

STANDIN_TOKENIZER_DIR = DATA / "tokenizers" / "t5-standin"

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"  # ids 0, 1, 2 in T5's sentencepiece vocabulary

# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
# T5 v1.1 fields shared by every preset (google/t5-v1_1-xxl config.json)
_T5_V1_1 = dict(
    vocab_size=32128,  # 32000 sentencepiece pieces + 100 sentinels, padded to a multiple of 128
    feed_forward_proj="gated-gelu",  # v1.1: GEGLU feed-forward (wi_0, wi_1, wo), gelu_new activation
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6,
    dropout_rate=0.0,  # google's config says 0.1; inference never drops, 0 keeps train-mode calls exact too
    initializer_factor=1.0,
    is_encoder_decoder=True,
    tie_word_embeddings=False,  # v1.1 unties the LM head; the encoder still shares `shared` with embed_tokens
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)

T5_PRESETS = {
    "t5-v1_1-xxl": dict(_T5_V1_1, d_model=4096, d_ff=10240, num_layers=24, num_decoder_layers=24,
                        num_heads=64, d_kv=64),
    # same family and vocabulary (any tokenizer's ids fit), small enough to run in a unit test
    "tiny": dict(_T5_V1_1, d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=8),
    # the quality testbed's encoder (utils.testbed.minimodel): its own word-level vocabulary of the captions
    "mini": dict(_T5_V1_1, vocab_size=128, d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                 d_kv=16),
}


def build_t5_encoder(preset: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
                     seed: int = 0) -> T5EncoderModel:
    """A ``T5EncoderModel`` with random weights (``device="cpu"``) or none at all (``device="meta"``).

    The model is built on the meta device and, for "cpu", materialised directly in ``dtype`` by
    ``weights.materialize_random``, so a bf16 T5-XXL (9.5 GB) never passes through fp32 (19 GB).
    Upstream's v1.2 inference dtype is fp32 (``T5Encoder(dtype=torch.float)``).
    """
    if preset not in T5_PRESETS:
        raise ValueError(f"unknown T5 preset {preset!r}; accepted: {sorted(T5_PRESETS)}")
    if device not in ("cpu", "meta"):
        raise ValueError(f"device must be 'cpu' (random weights) or 'meta' (shapes only), got {device!r}")
    with torch.device("meta"):
        model = T5EncoderModel(T5Config(**T5_PRESETS[preset]))
    if device == "cpu":
        materialize_random(model, dtype, seed)  # re-ties `shared` and `encoder.embed_tokens`
    else:
        model.to(dtype=dtype)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------
class StandinTokenizerWarning(UserWarning):
    """The real T5 vocabulary is absent: token ids differ from upstream's."""


warnings.filterwarnings("once", category=StandinTokenizerWarning, append=True)  # once per reason


def standin_corpus() -> list[str]:
    """The shipped prompts exactly as the tokenizer will see them: scored, then cleaned twice."""
    prompts = [line.strip() for line in PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [text_preprocessing(prompt) for prompt in append_score_to_prompts(prompts)]


def train_standin_tokenizer(corpus_lines: list[str], out_dir: str | Path, vocab_size: int = 1000) -> Path:
    """Train the stand-in tokenizer on ``corpus_lines`` and save it to ``out_dir`` (tokenizer.json + config).

    A sentencepiece-like Unigram model with T5's special ids (``<pad>``=0, ``</s>``=1, ``<unk>``=2),
    NFKC + lower-case normalisation, T5's whitespace split + Metaspace, and ``</s>`` appended to every
    sequence.
    Every ASCII letter, digit and punctuation mark is in the alphabet, so English prompts never map to
    ``<unk>``. ``vocab_size`` is an upper bound: a small corpus yields fewer pieces.
    """
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    # as transformers' T5Tokenizer: runs of whitespace collapse (sentencepiece's remove_extra_whitespaces)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()])
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, EOS_TOKEN, UNK_TOKEN],
        unk_token=UNK_TOKEN,
        initial_alphabet=list(string.ascii_lowercase + string.digits + string.punctuation),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_lines, trainer)
    # T5's tokenizer appends EOS and no BOS (add_special_tokens=True upstream)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}",
        pair=f"$A {EOS_TOKEN} $B:1 {EOS_TOKEN}:1",
        special_tokens=[(EOS_TOKEN, tokenizer.token_to_id(EOS_TOKEN))],
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
    )
    out_dir = Path(out_dir)
    wrapped.save_pretrained(out_dir)
    return out_dir


def load_standin_tokenizer(reason: str = "requested") -> PreTrainedTokenizerFast:
    """The committed stand-in tokenizer, with ``is_standin = True`` and a warning saying what it means."""
    warnings.warn(
        f"Using the stand-in T5 tokenizer ({STANDIN_TOKENIZER_DIR}): {reason}. The real vocabulary "
        f"({T5_TOKENIZER_REPO} spiece.model) is absent, so token ids and text embeddings differ from upstream; "
        f"the 300-token length, padding, EOS, mask and determinism are kept. Pass load_tokenizer() a folder "
        f"holding the real tokenizer files to match upstream.",
        StandinTokenizerWarning,
        stacklevel=2,
    )
    tokenizer = PreTrainedTokenizerFast.from_pretrained(STANDIN_TOKENIZER_DIR, local_files_only=True)
    tokenizer.is_standin = True
    return tokenizer


def _has_tokenizer_files(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "spiece.model").is_file()


def _cached_t5_snapshot() -> Path | None:
    """The local Hugging Face cache folder of DeepFloyd/t5-v1_1-xxl, if any; never touches the network."""
    try:
        return Path(snapshot_download(T5_TOKENIZER_REPO, local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerFast:
    """The T5 tokenizer from the folder ``path`` (None: the local HF cache), else the stand-in.

    The real tokenizer is read from ``tokenizer.json`` or ``spiece.model`` (what ``DeepFloyd/t5-v1_1-xxl``
    ships). A folder without either, or no cached snapshot, gives the stand-in and a
    ``StandinTokenizerWarning``; a ``path`` that is not a folder raises. The result has ``is_standin``.
    """
    if path is not None:
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"tokenizer folder {folder} does not exist; pass a folder holding tokenizer.json or spiece.model "
                f"(as {T5_TOKENIZER_REPO} does), or None to use the Hugging Face cache or the stand-in"
            )
        searched = str(folder)
    else:
        folder = _cached_t5_snapshot()
        searched = f"the Hugging Face cache ({T5_TOKENIZER_REPO})"
    if folder is not None and folder.resolve() == STANDIN_TOKENIZER_DIR.resolve():
        return load_standin_tokenizer()
    if folder is None or not _has_tokenizer_files(folder):
        return load_standin_tokenizer(f"no tokenizer.json or spiece.model in {searched}")
    if (folder / "spiece.model").is_file():
        # upstream's AutoTokenizer on DeepFloyd's files resolves to this class; spiece.model needs protobuf
        tokenizer = T5Tokenizer.from_pretrained(folder, local_files_only=True)
    else:  # a tokenizer.json of our own (the mini model's word-level vocabulary)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    tokenizer.is_standin = False
    return tokenizer


# ---------------------------------------------------------------------------------------------
# encoder
# ---------------------------------------------------------------------------------------------
class T5TextEncoder:
    """Upstream's ``T5Encoder.encode``: prompts -> ``y=[n, 1, 300, d_model]``, ``mask=[n, 300]``.

    Prompts are expected already scored and cleaned (``captions.append_score_to_prompts`` then
    ``captions.text_preprocessing``), as ``scripts/inference.py`` does before sampling.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast, model: T5EncoderModel,
                 model_max_length: int = MODEL_MAX_LENGTH):
        self.tokenizer = tokenizer
        self.model = model
        self.model_max_length = model_max_length
        self.output_dim = model.config.d_model  # upstream passes it to STDiT3 as caption_channels

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def is_standin(self) -> bool:
        """True when token ids come from the stand-in vocabulary, not upstream's."""
        return bool(getattr(self.tokenizer, "is_standin", False))

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``attention_mask``, both [n, 300] int64, with upstream's tokenizer arguments."""
        _check_prompts(prompts)
        tokens = self.tokenizer(
            list(prompts),
            max_length=self.model_max_length,
            padding="max_length",  # always 300 tokens, whatever the prompt length
            truncation=True,
            return_attention_mask=True,
            add_special_tokens=True,  # appends </s>; truncation keeps it as the last token
            return_tensors="pt",
        )
        return tokens["input_ids"], tokens["attention_mask"]

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """``y`` [n, 1, 300, d_model] in the model's dtype, ``mask`` [n, 300] int64 (1 on real tokens)."""
        input_ids, mask = self.tokenize(prompts)
        device = self.model.device
        input_ids, mask = input_ids.to(device), mask.to(device)
        with torch.inference_mode():
            hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # [n, 300, d_model]
        return dict(y=hidden[:, None], mask=mask)  # y: [n, 1, 300, d_model]


def _check_prompts(prompts: list[str]) -> None:
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a list of non-empty strings, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("prompts is empty; pass a list of one or more non-empty strings")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt {index} is {prompt!r}; each prompt must be a string with visible text")


if __name__ == "__main__":
    print(train_standin_tokenizer(standin_corpus(), STANDIN_TOKENIZER_DIR))
