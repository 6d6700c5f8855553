"""Text encoder: T5 shapes against the official manifest, prompt cleaning against upstream, tokenizers."""
import json

import pytest
import sentencepiece
import torch

from utils.model import text_encoder as te
from utils.model.captions import append_score_to_prompts, clean_caption, text_preprocessing
from utils.model.weights import read_manifest, state_dict_shapes
from utils.paths import PROMPTS

SAMPLE_PROMPTS = PROMPTS.read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def standin():
    with pytest.warns(te.StandinTokenizerWarning):
        return te.load_standin_tokenizer()


@pytest.fixture(scope="module")
def tiny_encoder(standin):
    return te.T5TextEncoder(standin, te.build_t5_encoder("tiny", device="cpu", seed=0))


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
def test_xxl_on_meta_matches_official_manifest():
    model = te.build_t5_encoder("t5-v1_1-xxl", device="meta")
    manifest = read_manifest("t5")
    assert len(manifest) == 220
    assert state_dict_shapes(model) == manifest
    assert {t.dtype for t in model.state_dict().values()} == {torch.float32}
    assert model.shared.weight is model.encoder.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == 4_762_310_656  # section 2.4 of the brief
    assert not model.training


def test_xxl_config_is_t5_v1_1():
    config = te.build_t5_encoder("t5-v1_1-xxl", device="meta").config
    sizes = (config.d_model, config.d_ff, config.num_layers, config.num_heads, config.d_kv)
    assert sizes == (4096, 10240, 24, 64, 64)
    assert config.is_gated_act and config.dense_act_fn == "gelu_new"
    assert (config.relative_attention_num_buckets, config.relative_attention_max_distance) == (32, 128)


def test_bf16_build_materialises_directly_in_bf16(monkeypatch):
    calls, materialize_random = [], te.materialize_random

    def spy(module, dtype, seed=0):
        calls.append(dict(dtype=dtype, devices={p.device.type for p in module.parameters()}))
        return materialize_random(module, dtype, seed)

    monkeypatch.setattr(te, "materialize_random", spy)
    model = te.build_t5_encoder("tiny", dtype=torch.bfloat16, device="cpu")
    # the only real allocation is materialize_random's, in bf16, starting from meta tensors
    assert calls == [dict(dtype=torch.bfloat16, devices={"meta"})]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert model.shared.weight is model.encoder.embed_tokens.weight  # re-tied after to_empty
    assert state_dict_shapes(model) == state_dict_shapes(te.build_t5_encoder("tiny", device="meta"))


def test_random_weights_depend_on_seed_only():
    a, b, c = (te.build_t5_encoder("tiny", device="cpu", seed=s) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.shared.weight, c.shared.weight)


def test_build_rejects_unknown_preset_and_device():
    with pytest.raises(ValueError, match="tiny"):
        te.build_t5_encoder("t5-xxl")
    with pytest.raises(ValueError, match="meta"):
        te.build_t5_encoder("tiny", device="cuda")


# ---------------------------------------------------------------------------------------------
# prompt preprocessing (expected strings worked out from upstream's regexes)
# ---------------------------------------------------------------------------------------------
def _upstream_prompt(text):
    return text_preprocessing(append_score_to_prompts([text])[0])


def test_append_score_like_upstream():
    assert append_score_to_prompts(["A cat."]) == ["A cat. aesthetic score: 6.5."]
    assert append_score_to_prompts(["A cat. aesthetic score: 5.0."]) == ["A cat. aesthetic score: 5.0."]
    assert append_score_to_prompts(["A cat."], aes=7, flow=2.25, camera_motion="pan right") == [
        "A cat. aesthetic score: 7.0. motion score: 2.2. camera motion: pan right."]
    assert append_score_to_prompts(["A cat."], aes=None) == ["A cat."]


@pytest.mark.parametrize("prompt, expected", [
    ("A cartoon kangaroo disco dances.",
     "a cartoon kangaroo disco dances. aesthetic score: 6.5."),
    # curly apostrophe -> "'", no final period kept as is
    ("Extreme close up of a 24 year old woman’s eye blinking, standing in Marrakech during magic hour, "
     "cinematic film shot in 70mm, depth of field, vivid colors, cinematic",
     "extreme close up of a 24 year old woman's eye blinking, standing in marrakech during magic hour, "
     "cinematic film shot in 70mm, depth of field, vivid colors, cinematic aesthetic score: 6.5."),
    # em dash -> "-"; two dashes in total, so "sci-fi" keeps its hyphen
    ("The camera rotates around a large stack of vintage televisions all showing different programs — 1950s "
     "sci-fi movies, horror movies, news, static, a 1970s sitcom, etc, set inside a large New York museum gallery.",
     "the camera rotates around a large stack of vintage televisions all showing different programs - 1950s "
     "sci-fi movies, horror movies, news, static, a 1970s sitcom, etc, set inside a large new york museum "
     "gallery. aesthetic score: 6.5."),
    # four hyphens (> 3): every hyphen becomes a space; " , " is left alone
    ("An extreme close-up of an gray-haired man with a beard in his 60s, he is deep in thought pondering the "
     "history of the universe as he sits at a cafe in Paris, his eyes focus on people offscreen as they walk as "
     "he sits mostly motionless, he is dressed in a wool coat suit coat with a button-down shirt , he wears a "
     "brown beret and glasses and has a very professorial appearance, and the end he offers a subtle "
     "closed-mouth smile as if he found the answer to the mystery of life, the lighting is very cinematic with "
     "the golden light and the Parisian streets and city in the background, depth of field, cinematic 35mm film.",
     "an extreme close up of an gray haired man with a beard in his 60s, he is deep in thought pondering the "
     "history of the universe as he sits at a cafe in paris, his eyes focus on people offscreen as they walk as "
     "he sits mostly motionless, he is dressed in a wool coat suit coat with a button down shirt , he wears a "
     "brown beret and glasses and has a very professorial appearance, and the end he offers a subtle "
     "closed mouth smile as if he found the answer to the mystery of life, the lighting is very cinematic with "
     "the golden light and the parisian streets and city in the background, depth of field, cinematic 35mm "
     "film. aesthetic score: 6.5."),
])
def test_sample_prompts_preprocess_like_upstream(prompt, expected):
    assert prompt in SAMPLE_PROMPTS
    assert _upstream_prompt(prompt) == expected


@pytest.mark.parametrize("caption, expected", [
    ("Visit https://example.com/page or www.site.org NOW!!!", "visit or now!!!"),  # URLs dropped
    ("A cat+dog %20 in the <b>sun</b> &amp; rain", "a cat dog in the sun rain"),  # unquote_plus, HTML
    ("@user posted #123 pic.jpg at 192.168.0.1 page 3", "posted at"),  # handle, id, file, ip, page
    ("a 1920x1080 frame, jc6640 and 6640vc231", "a frame, and"),  # sizes and product codes
    ("a 3/4 view {of} [the] *cake*", "a 3 4 view of the cake"),  # bad punctuation -> space
    ("this-is-my-cute-cat-video", "this is my cute cat video"),
    ("«quotes» “and” ‘these’", 'quotes" "and" \'these'),  # trailing quote survives the final strip
    ("  'quoted prompt'  ", "quoted prompt"),
    ("东京 street 日本", "street"),  # CJK removed
    ("e.g.the end", "e. g. the end"),
    ("the beach.it was sunny", "the was sunny"),  # ".it" reads as a domain
    ("c%2B%2B code", "c code"),  # the second clean_caption pass is not a no-op
])
def test_clean_caption_quirks(caption, expected):
    assert text_preprocessing(caption) == expected


def test_text_preprocessing_is_clean_caption_twice():
    assert clean_caption("c%2B%2B code") == "c++ code"
    for prompt in SAMPLE_PROMPTS:
        assert text_preprocessing(prompt) == clean_caption(clean_caption(prompt))


# ---------------------------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------------------------
def test_standin_tokenizer_pads_truncates_and_ends_with_eos(standin, tiny_encoder):
    assert standin.is_standin and tiny_encoder.is_standin
    assert (standin.pad_token_id, standin.eos_token_id, standin.unk_token_id) == (0, 1, 2)
    prompts = [_upstream_prompt(SAMPLE_PROMPTS[22]), _upstream_prompt(" ".join(SAMPLE_PROMPTS))]
    ids, mask = tiny_encoder.tokenize(prompts)
    assert ids.shape == mask.shape == (2, te.MODEL_MAX_LENGTH)
    assert ids.dtype == mask.dtype == torch.int64
    assert int(ids.max()) < te.T5_PRESETS["t5-v1_1-xxl"]["vocab_size"]

    length = int(mask[0].sum())
    assert 3 < length < te.MODEL_MAX_LENGTH
    assert ids[0, length - 1] == 1 and 1 not in ids[0, : length - 1].tolist()  # one EOS, right after the text
    assert (ids[0, length:] == 0).all() and (mask[0, length:] == 0).all() and (mask[0, :length] == 1).all()
    assert 2 not in ids[0].tolist()  # no <unk> for an English prompt

    assert mask[1].all() and ids[1, -1] == 1  # truncated to 300 with EOS kept last
    again, _ = tiny_encoder.tokenize(prompts)
    assert torch.equal(ids, again)


def test_committed_standin_is_loaded_not_trained(standin):
    config = json.loads((te.STANDIN_TOKENIZER_DIR / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "</s>" and config["pad_token"] == "<pad>"
    assert standin.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    assert standin("a cat").input_ids == standin("A  CAT").input_ids  # NFKC + lower-case


def test_train_standin_tokenizer(tmp_path):
    te.train_standin_tokenizer(te.standin_corpus(), tmp_path)
    trained = te.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert trained.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    assert trained("a cat").input_ids[-1] == 1


def test_load_tokenizer_falls_back_to_standin_with_warning(tmp_path):
    with pytest.warns(te.StandinTokenizerWarning, match="no tokenizer.json or spiece.model"):
        tokenizer = te.load_tokenizer(tmp_path)
    assert tokenizer.is_standin
    with pytest.raises(FileNotFoundError, match="does not exist"):
        te.load_tokenizer(tmp_path / "missing")


def test_load_tokenizer_reads_a_real_spiece_model_like_sentencepiece(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(te.standin_corpus()))
    folder = tmp_path / "t5"
    folder.mkdir()
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "spiece"), model_type="unigram", vocab_size=300,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 100}))
    tokenizer = te.load_tokenizer(folder)
    assert not tokenizer.is_standin
    reference = sentencepiece.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    # the slow T5 tokenizer is sentencepiece plus </s>; NFKC-mapped characters included
    for text in te.standin_corpus()[:10] + ["ａｂｃ ﬁ café ½", "hello   world"]:
        assert tokenizer(text).input_ids == reference.encode(text) + [1]


# ---------------------------------------------------------------------------------------------
# encoder
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_shapes(standin, dtype):
    encoder = te.T5TextEncoder(standin, te.build_t5_encoder("tiny", dtype=dtype, device="cpu"))
    prompts = [_upstream_prompt(p) for p in SAMPLE_PROMPTS[:3]]
    out = encoder.encode(prompts)
    assert out["y"].shape == (3, 1, te.MODEL_MAX_LENGTH, 32) and out["y"].dtype == dtype
    assert out["mask"].shape == (3, te.MODEL_MAX_LENGTH) and out["mask"].dtype == torch.int64
    assert torch.isfinite(out["y"]).all()
    assert torch.equal(out["y"], encoder.encode(prompts)["y"])
    assert encoder.output_dim == 32 and encoder.dtype == dtype


@pytest.mark.parametrize("prompts", [[], [""], ["a cat", "   "], "a cat", [None]])
def test_encode_rejects_empty_prompts(tiny_encoder, prompts):
    with pytest.raises(ValueError, match="non-empty|visible text"):
        tiny_encoder.encode(prompts)
