"""Prompt preprocessing, exactly as Open-Sora 1.2 inference applies it before T5 sees a prompt.

``scripts/inference.py`` runs, per prompt: ``append_score_to_prompts`` (``opensora/utils/inference_utils.py``)
then ``text_preprocessing`` (``opensora/models/text_encoder/t5.py``, adapted from PixArt/DeepFloyd IF), which
is ``clean_caption`` applied twice. Every regex below is upstream's, in upstream's order; the spelling of a
few patterns is normalised (raw strings, ``+`` for ``{1,}``) without changing what they match.
"""
from __future__ import annotations

import html
import re
import urllib.parse

import ftfy
from bs4 import BeautifulSoup

AESTHETIC_SCORE = 6.5  # `aes` in configs/opensora-v1-2/inference/sample.py

# one character class of punctuation that upstream turns into a space ("***AUSVERKAUFT***", "#AUSVERKAUFT")
BAD_PUNCT_REGEX = re.compile(r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\\/\*]+")

# "this-is-my-cute-cat" / "this_is_my_cute_cat": more than 3 of these and they all become spaces
WORD_JOINER_REGEX = re.compile(r"(?:\-|\_)")

URL_REGEXES = (
    re.compile(r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))"),
    re.compile(r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))"),
)

CJK_RANGES = (
    r"[\u31c0-\u31ef]+",  # CJK Strokes
    r"[\u31f0-\u31ff]+",  # Katakana Phonetic Extensions
    r"[\u3200-\u32ff]+",  # Enclosed CJK Letters and Months
    r"[\u3300-\u33ff]+",  # CJK Compatibility
    r"[\u3400-\u4dbf]+",  # CJK Unified Ideographs Extension A
    r"[\u4dc0-\u4dff]+",  # Yijing Hexagram Symbols
    r"[\u4e00-\u9fff]+",  # CJK Unified Ideographs
)

DASHES = (
    r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0"
    r"\uFE31\uFE32\uFE58\uFE63\uFF0D]+"
)


def append_score_to_prompts(
    prompts: list[str],
    aes: float | None = AESTHETIC_SCORE,
    flow: float | None = None,
    camera_motion: str | None = None,
) -> list[str]:
    """Append `` aesthetic score: 6.5.`` (and the motion / camera scores when set) unless already present."""
    scored = []
    for prompt in prompts:
        new_prompt = prompt
        if aes is not None and "aesthetic score:" not in prompt:
            new_prompt = f"{new_prompt} aesthetic score: {aes:.1f}."
        if flow is not None and "motion score:" not in prompt:
            new_prompt = f"{new_prompt} motion score: {flow:.1f}."
        if camera_motion is not None and "camera motion:" not in prompt:
            new_prompt = f"{new_prompt} camera motion: {camera_motion}."
        scored.append(new_prompt)
    return scored


def basic_clean(text: str) -> str:
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))  # upstream unescapes twice (double-escaped scraped captions)
    return text.strip()


def clean_caption(caption: str) -> str:
    """One pass of upstream's caption cleaner: lower-case, strip URLs, HTML, handles, ids, bad punctuation."""
    caption = str(caption)
    caption = urllib.parse.unquote_plus(caption)  # upstream URL-decodes every prompt: "+" becomes a space
    caption = caption.strip().lower()
    caption = re.sub("<person>", "person", caption)
    for url_regex in URL_REGEXES:
        caption = re.sub(url_regex, "", caption)
    caption = BeautifulSoup(caption, features="html.parser").text
    caption = re.sub(r"@[\w\d]+\b", "", caption)  # @nickname
    for cjk_range in CJK_RANGES:
        caption = re.sub(cjk_range, "", caption)
    caption = re.sub(DASHES, "-", caption)  # every kind of dash becomes "-"
    caption = re.sub(r"[`´«»“”¨]", '"', caption)
    caption = re.sub(r"[‘’]", "'", caption)
    caption = re.sub(r"&quot;?", "", caption)
    caption = re.sub(r"&amp", "", caption)
    caption = re.sub(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " ", caption)  # ip addresses
    caption = re.sub(r"\d:\d\d\s+$", "", caption)  # article ids
    caption = re.sub(r"\\n", " ", caption)  # a literal backslash-n
    caption = re.sub(r"#\d{1,3}\b", "", caption)  # "#123"
    caption = re.sub(r"#\d{5,}\b", "", caption)  # "#12345.."
    caption = re.sub(r"\b\d{6,}\b", "", caption)  # "123456.."
    caption = re.sub(r"[\S]+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", "", caption)  # file names
    caption = re.sub(r"[\"\']{2,}", r'"', caption)  # """AUSVERKAUFT"""
    caption = re.sub(r"[\.]{2,}", r" ", caption)  # an ellipsis becomes a space
    caption = re.sub(BAD_PUNCT_REGEX, r" ", caption)
    caption = re.sub(r"\s+\.\s+", r" ", caption)  # " . "
    if len(re.findall(WORD_JOINER_REGEX, caption)) > 3:
        caption = re.sub(WORD_JOINER_REGEX, " ", caption)

    caption = basic_clean(caption)

    caption = re.sub(r"\b[a-zA-Z]{1,3}\d{3,15}\b", "", caption)  # jc6640
    caption = re.sub(r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", "", caption)  # jc6640vc
    caption = re.sub(r"\b\d+[a-zA-Z]+\d+\b", "", caption)  # 6640vc231
    caption = re.sub(r"(worldwide\s+)?(free\s+)?shipping", "", caption)
    caption = re.sub(r"(free\s)?download(\sfree)?", "", caption)
    caption = re.sub(r"\bclick\b\s(?:for|on)\s\w+", "", caption)
    caption = re.sub(r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?", "", caption)
    caption = re.sub(r"\bpage\s+\d+\b", "", caption)
    caption = re.sub(r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", r" ", caption)  # j2d1a2a...
    caption = re.sub(r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", "", caption)  # sizes such as 1920x1080
    caption = re.sub(r"\b\s+\:\s+", r": ", caption)
    caption = re.sub(r"(\D[,\./])\b", r"\1 ", caption)  # a space after punctuation glued to the next word
    caption = re.sub(r"\s+", " ", caption)
    # upstream calls `caption.strip()` here and drops the result, so the four edits below see the
    # unstripped text: a leading/trailing space protects the quote and punctuation at that end
    caption = re.sub(r"^[\"\']([\w\W]+)[\"\']$", r"\1", caption)
    caption = re.sub(r"^[\'\_,\-\:;]", r"", caption)
    caption = re.sub(r"[\'\_,\-\:\-\+]$", r"", caption)
    caption = re.sub(r"^\.\S+$", "", caption)
    return caption.strip()


def text_preprocessing(text: str) -> str:
    """Upstream's ``text_preprocessing(text, use_text_preprocessing=True)``: the training-time cleaning."""
    text = clean_caption(text)
    text = clean_caption(text)  # upstream cleans twice; the second pass is not always a no-op
    return text
