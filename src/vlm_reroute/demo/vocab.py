"""The demo model's word-level tokenizer, chat template and answer encoding.

Every word the scenes use is one token (lower-cased, with a leading ``▁`` as SentencePiece marks a
word start), every box coordinate ``0.00`` … ``1.00`` is one token, and ``[``, ``]`` and ``,`` are
tokens of their own. Decoding writes ``,`` as ``", "`` and drops the word marks, so a generated box
reads exactly ``[0.12, 0.30, 0.50, 0.70]`` — LLaVA-1.5's RefCOCO format, which the project's LLaVA
parser reads. One token per coordinate makes a box nine tokens, and lets the training loss treat
neighbouring coordinates as near misses (see :mod:`vlm_reroute.demo.train`).
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .draw import COLORS, SHAPES
from .scenes import EXTREMES

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID, IMAGE_ID = range(len(SPECIALS))
PUNCT = ("[", "]", ",", ".", "?", ":", "'", "-", "!")
COORDS = tuple(f"{k / 100:.2f}" for k in range(101))
_WORDS = [
    "user",
    "assistant",
    "give",
    "the",
    "bounding",
    "box",
    "of",
    "left",
    "right",
    "above",
    "below",
    "what",
    "color",
    "colour",
    "is",
    "shape",
    "shapes",
    "how",
    "many",
    "are",
    "there",
    "a",
    "an",
    "yes",
    "no",
    "object",
    "objects",
    "where",
    "which",
    "in",
    "this",
    "image",
    "picture",
    "and",
    "or",
    "to",
    "find",
    "show",
    "me",
    "please",
    "thing",
    "things",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "zero",
]
WORDS = tuple(
    dict.fromkeys(
        [*_WORDS, *COLORS, *SHAPES, *(s + "s" for s in SHAPES), *EXTREMES, *(str(d) for d in range(10))]
    )
)
MARK = "▁"
#: LLaVA-1.5's conversation format, one ``<image>`` per image before the text
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %} {% else %}ASSISTANT: {% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def vocabulary() -> dict[str, int]:
    """Token → id: specials, punctuation, coordinates, then words (with and without a word mark)."""
    tokens = [*SPECIALS, *PUNCT, *COORDS, MARK, *(MARK + p for p in PUNCT), *(MARK + w for w in WORDS)]
    tokens += [MARK + c for c in COORDS]  # a coordinate typed after a space; never generated
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The fast tokenizer (``AutoTokenizer`` loads it back from ``save_pretrained``)."""
    core = Tokenizer(models.WordLevel(vocab=vocabulary(), unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=MARK, prepend_scheme="always", split=True),
            pre_tokenizers.Split(Regex(rf"{MARK}?(?:\d\.\d\d|[\[\],.?:'!-])"), behavior="isolated"),
        ]
    )
    core.decoder = decoders.Sequence(
        [decoders.Replace(",", ", "), decoders.Metaspace(replacement=MARK, prepend_scheme="always")]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.padding_side = "left"
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def box_text(box: Sequence[float], width: float, height: float) -> str:
    """A pixel box as the model answers it: ``[x1, y1, x2, y2]`` normalised, two decimals."""
    x1, y1, x2, y2 = box
    values = (x1 / width, y1 / height, x2 / width, y2 / height)
    return "[" + ", ".join(f"{min(max(v, 0.0), 1.0):.2f}" for v in values) + "]"


def answer_ids(answer: str) -> list[int]:
    """Token ids of an answer (a box string or one word), ending with ``</s>``.

    Built from the vocabulary directly, so a box is always the nine tokens ``[ x , y , x , y ]``.
    """
    vocab = vocabulary()
    if answer.startswith("["):
        coords = answer.strip("[]").split(", ")
        ids = [vocab["["]]
        for k, c in enumerate(coords):
            ids += ([vocab[","]] if k else []) + [vocab[c]]
        return [*ids, vocab["]"], EOS_ID]
    return [vocab.get(MARK + answer.lower(), UNK_ID), EOS_ID]


def coordinate_ids() -> list[int]:
    """The ids of ``0.00`` … ``1.00``, in order."""
    vocab = vocabulary()
    return [vocab[c] for c in COORDS]


def vqa_answer_ids() -> list[int]:
    """The ids of every one-word VQA answer: the colours, the shapes, the counts 0–9, yes and no."""
    words = (*COLORS, *SHAPES, *(str(k) for k in range(10)), "yes", "no")
    ids = [answer_ids(w)[0] for w in words]
    if UNK_ID in ids:  # pragma: no cover - the vocabulary is built from these words
        raise RuntimeError(f"a VQA answer word is not in the vocabulary: {words[ids.index(UNK_ID)]!r}")
    return ids
