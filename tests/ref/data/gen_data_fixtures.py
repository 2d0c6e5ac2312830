#!/usr/bin/env python3
"""Writes the data-pipeline fixtures that tests/data/*.cpp (test_data) check the C++ tokenizer against.

Oracle: the Hugging Face `tokenizers` library (pinned in requirements.txt), never the C++ code.

Outputs (deterministic; `--check` compares instead of writing):
  tests/fixtures/data/tokenizer.json            byte-level BPE trained here with DeepSeek's pre-tokenizer chain
  data/tokenizer.json                           the same bytes, for demos
  tests/fixtures/data/tokenizer_variant_{a,b,c}.json   the same vocabulary with other pre-tokenizers /
                                                added tokens / post-processors / decoders (more code paths)
  tests/fixtures/data/tokenizer_cases.jsonl     text -> ids (+ decode) for each tokenizer
  tests/fixtures/data/decode_cases.jsonl        random id lists -> decoded text
  tests/fixtures/data/chat_cases.jsonl          V4 chat conversations -> text, ids, assistant loss mask
  tests/fixtures/data/unicode_classes.json      Oniguruma's \\s \\p{L} \\p{N} \\p{P} \\p{S} \\p{M} as code-point ranges
  src/data/unicode_extras.inc                   what the C++ regex layer adds to PCRE2's Unicode 14 classes

DeepSeek's pre-tokenizer chain (three Split regexes, then ByteLevel without its own regex) is the one of the
DeepSeek-V3 tokenizer.json, which DeepSeek-V4 keeps ("same tokenizer", 128K vocabulary). Public copies:
  - ggml-org/llama.cpp, src/llama-vocab.cpp (commit 00ad355e), case LLAMA_VOCAB_PRE_TYPE_DEEPSEEK3_LLM:
    the three regexes in order, transcribed from the DeepSeek-V3 tokenizer.json;
  - GGUF loaders of DeepSeek-V4-Flash require tokenizer.ggml.pre == "deepseek-v3" (same three regexes);
  - a census of hub tokenizers lists deepseek-ai/DeepSeek-V4-Flash-0731's pre_tokenizer as exactly
    Split(\\p{N}{1,3}) > Split([一-龥぀-ゟ゠-ヿ]+) > Split(<main regex>) > ByteLevel(add_prefix_space=false,
    use_regex=false), every Split "Isolated", invert false.
The V4 chat format follows DeepSeek's encoding/encoding_dsv4.py (copies: supermy/ds4rs and
sfxnz/DeepSeek-V4-Flash-Vision-Exp-vLLM-2x-DGX-Spark, encoding/encoding_dsv4.py); render_chat below is an
independent re-implementation of its rules for system/user/developer/assistant messages (no tools).
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import unicodedata
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
FIX = ROOT / "tests" / "fixtures" / "data"

# ---- DeepSeek-V3/V4 pre-tokenizer regexes (JSON "\r\n" in the third one are real CR/LF characters) ----
DS_DIGITS = r"\p{N}{1,3}"
DS_CJK = "[一-龥぀-ゟ゠-ヿ]+"
DS_MAIN = ("[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
           " ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+")

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
REMINDER = "<｜latest_reminder｜>"
THINK = "<think>"
THINK_END = "</think>"
SPECIALS = [BOS, EOS, PAD, USER, ASSISTANT, REMINDER]
VOCAB_SIZE = 1500
SEED = 20260424


def deepseek_pre_tokenizer():
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(DS_DIGITS), behavior="isolated", invert=False),
        pre_tokenizers.Split(Regex(DS_CJK), behavior="isolated", invert=False),
        pre_tokenizers.Split(Regex(DS_MAIN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def training_texts():
    texts = [r["text"] for r in read_jsonl(ROOT / "data" / "text.jsonl")]
    for r in read_jsonl(ROOT / "data" / "chat.jsonl"):
        for m in r["messages"]:
            texts.append(m["content"])
            if m.get("reasoning_content"):
                texts.append(m["reasoning_content"])
    return texts


def train_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([])
    tok.pre_tokenizer = deepseek_pre_tokenizer()
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  special_tokens=[AddedToken(s, special=True, normalized=False) for s in SPECIALS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_texts(), trainer=trainer)
    # <think> / </think> are ordinary (non-special) added tokens, as in DeepSeek's released tokenizers.
    tok.add_tokens([AddedToken(THINK, special=False, normalized=True),
                    AddedToken(THINK_END, special=False, normalized=True)])
    return tok


def variant_a(base: dict) -> dict:
    """TemplateProcessing that adds BOS; added tokens with lstrip/rstrip, single_word, and one inside words."""
    j = copy.deepcopy(base)
    bos_id = next(t["id"] for t in j["added_tokens"] if t["content"] == BOS)
    j["post_processor"] = json.loads(processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]).__getstate__())
    tok = Tokenizer.from_str(json.dumps(j))
    tok.add_tokens([AddedToken("[MASK]", special=True, lstrip=True, rstrip=True, normalized=False),
                    AddedToken("<sw>", single_word=True, special=False, normalized=True),
                    AddedToken("house", special=False, normalized=True)])
    return json.loads(tok.to_str())


def variant_b(base: dict) -> dict:
    """Other Split behaviours, Digits, GPT-2 ByteLevel (its own regex, prefix space)."""
    j = copy.deepcopy(base)
    j["pre_tokenizer"] = json.loads(pre_tokenizers.Sequence([
        pre_tokenizers.Split("-", behavior="merged_with_next"),
        pre_tokenizers.Split(Regex(r"[,;:]"), behavior="merged_with_previous"),
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="contiguous"),
        pre_tokenizers.Digits(individual_digits=False),
        pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True),
    ]).__getstate__())
    return j


def variant_c(base: dict) -> dict:
    """Removed / inverted splits, ignore_merges, no decoder (tokens joined by spaces), no post-processor."""
    j = copy.deepcopy(base)
    j["pre_tokenizer"] = json.loads(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\s+"), behavior="removed"),
        pre_tokenizers.Split(Regex(r"[\p{L}\p{M}]+|\p{N}+"), behavior="removed", invert=True),
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]).__getstate__())
    j["model"]["ignore_merges"] = True
    j["decoder"] = None
    j["post_processor"] = None
    return j


# ---- test strings -------------------------------------------------------------------------------------
HAND_CASES = [
    "", " ", "  ", "\n", "\n\n\n", "\r\n", "\t", "a", "Hello, world!", "Hello  world", "Hello world   ",
    "   leading spaces", "trailing tab\t", "The quick brown fox jumps over the lazy dog.",
    "I'm sure it's fine, isn't it? We'll see; they'd know.", "don't DON'T Don't",
    "1", "12", "123", "1234", "1234567", "3.14159", "2026-04-24", "1,000,000", "-273.15", "6.02e23", "v0.23.3",
    "+1 555 0100", "١٢٣٤٥ ٦", "１２３４５", "²³ ½ ¾ Ⅻ", "0x7fffffff", "100%",
    "你好，世界！", "在这个小镇上，每天早上六点。", "中文English混合mixed文本123数字",
    "日本語のテキスト、カタカナとひらがな。", "한국어 문장입니다.", "Русский текст", "Ελληνικά", "العربية", "עברית",
    "हिन्दी पाठ", "ภาษาไทย", "e\u0301te\u0301 cafe\u0301", "naïve coöperate", "ﬁ ligature",
    "def f(x):\n    return x * 2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
    "if x==1:pass", "a+=b; c->d; e::f; g<<h; i>>=j", "#include <vector>", "std::vector<int> v{1, 2, 3};",
    "SELECT * FROM t WHERE id = 42;", "https://example.com/path?q=1&r=2#frag", "user@example.com",
    "!!!???...", "...", "\"quoted\" 'single'", "(parens) [brackets] {braces}", "--flag=value -x",
    "a.b.c", ".hidden", "#hashtag @mention $dollar", "~/dir/file.txt", "C:\\Windows\\System32",
    "👍", "👍🏽", "👨‍👩‍👧", "🇯🇵🇫🇷", "🎉🚀✨ emoji at end 😀", "❤️", "a\u200db", "\ufeffBOM",
    "10\u00a0km", "wide\u3000space", "nel\u0085char", "mongolian\u180evs", "line\u2028sep", "para\u2029sep",
    "en\u2002em\u2003thin\u2009", "\x00null", "bell\x07", "esc\x1b[0m", "del\x7f", "vt\x0bff\x0c",
    "mixed \t \n \r\n  \n\t end", "  \n  ", "word\n\n\nword", "a  b   c    d",
    BOS, EOS, f"{BOS}Hello{EOS}", f"{BOS}system{USER}question{ASSISTANT}{THINK_END}answer{EOS}",
    f"{USER}{ASSISTANT}", f"{THINK}reasoning{THINK_END}answer", f"text {THINK} spaced {THINK_END} ",
    "<｜User", "｜>", "<think", "think>", "<｜begin▁of▁sentence｜", "▁", "<<think>>", "</think></think>",
    f"{USER}{USER}{USER}", "[MASK]", " [MASK] ", "a [MASK] b", "<sw> x<sw> <sw>y", "lighthouse houses",
    "x" * 200, " " * 300, "\n" * 50, "9" * 100, "一" * 50, "ab" * 150,
    "Ǆǅǆ ǈ ǋ", "ſ ß ẞ", "İstanbul ıi", "Ⓐⓑ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛",
]


def pools(extra_cps):
    ascii_letters = [chr(c) for c in range(0x41, 0x5B)] + [chr(c) for c in range(0x61, 0x7B)]
    digits = [chr(c) for c in range(0x30, 0x3A)] + list("٠١٢٣٤٥٦٧٨٩０１２３４５６７８９²³½Ⅻ")
    punct = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + list("，。！？、：；“”‘’（）《》—…·¡¿«»")
    spaces = [" ", " ", " ", "  ", "\t", "\n", "\r\n", "\r", "\u00a0", "\u3000", "\u2003", "\u0085", "\u180e",
              "\u2028", "\x0b", "\x0c", "\ufeff", "\u200b"]
    cjk = [chr(c) for c in range(0x4E00, 0x9FA6, 97)] + [chr(c) for c in range(0x3041, 0x3097)] + \
        [chr(c) for c in range(0x30A1, 0x30FB)] + [chr(c) for c in range(0xAC00, 0xD7A4, 331)]
    scripts = [chr(c) for r in [(0x0410, 0x0450), (0x0391, 0x03CA), (0x0621, 0x064B), (0x0905, 0x0940),
                                (0x0E01, 0x0E30), (0x05D0, 0x05EB), (0x00C0, 0x0100)] for c in range(*r)]
    marks = [chr(c) for c in range(0x0300, 0x0370)] + ["\u0901", "\u093e", "\u0e31", "\u20dd", "\ufe0f"]
    symbols = [chr(c) for c in range(0x1F300, 0x1F650, 7)] + ["\u200d", "\U0001F3FD", "€", "£", "¥", "©", "®",
                                                               "±", "×", "÷", "≤", "≠", "∞", "√", "→", "★", "♪"]
    controls = [chr(c) for c in range(0, 0x20) if c not in (9, 10, 13)] + ["\x7f", "\x80", "\x9f"]
    specials = [BOS, EOS, PAD, USER, ASSISTANT, REMINDER, THINK, THINK_END, "<｜", "｜>", "▁", "<think", "/think>"]
    extras = [chr(c) for c in extra_cps]
    return {
        "ascii": ascii_letters, "digits": digits, "punct": punct, "spaces": spaces, "cjk": cjk,
        "scripts": scripts, "marks": marks, "symbols": symbols, "controls": controls, "specials": specials,
        "extras": extras,
    }


def random_cases(rng: random.Random, words, extra_cps, n):
    p = pools(extra_cps)
    weights = {"words": 8, "ascii": 3, "digits": 3, "punct": 3, "spaces": 4, "cjk": 3, "scripts": 2, "marks": 1,
               "symbols": 2, "controls": 1, "specials": 1, "extras": 1}
    names = list(weights)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 40)):
            kind = rng.choices(names, weights=[weights[k] for k in names])[0]
            if kind == "words":
                w = rng.choice(words)
                parts.append(w if rng.random() < 0.6 else " " + w)
            else:
                parts.append("".join(rng.choice(p[kind]) for _ in range(rng.randint(1, 4))))
        out.append("".join(parts))
    return out


# ---- Unicode classes as Oniguruma (inside tokenizers) sees them ------------------------------------------
CLASSES = [("s", r"\s"), ("L", r"\p{L}"), ("N", r"\p{N}"), ("P", r"\p{P}"), ("S", r"\p{S}"), ("M", r"\p{M}")]


def to_ranges(cps):
    ranges = []
    for c in cps:
        if ranges and ranges[-1][1] == c - 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c])
    return ranges


def oniguruma_classes():
    cps = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    text = "".join(map(chr, cps))
    out = {}
    for name, pat in CLASSES:
        keep = bytearray(len(cps))
        for _, (a, b) in pre_tokenizers.Split(Regex(pat), behavior="removed").pre_tokenize_str(text):
            keep[a:b] = b"\x01" * (b - a)
        out[name] = to_ranges([cps[i] for i in range(len(cps)) if not keep[i]])
    return out


def extras_inc(classes) -> str:
    """Code points Oniguruma puts in a class that Unicode 14.0 (PCRE2 10.42, Python 3.11) leaves unassigned."""
    lines = [
        "// Generated by tests/ref/data/gen_data_fixtures.py -- do not edit.",
        f"// Oracle: tokenizers {tokenizers.__version__} (Oniguruma); unassigned = Python unicodedata "
        f"{unicodedata.unidata_version}.",
        "// kWhiteSpace: what Oniguruma's \\s matches (Unicode White_Space; PCRE2's \\s adds U+180E).",
        "// kExtra*: code points that Oniguruma's \\p{X} matches but that are unassigned in Unicode "
        f"{unicodedata.unidata_version},",
        "// the Unicode version of PCRE2 10.42's tables; regex.cpp adds them to \\p{X} so that PCRE2 pre-tokenizes",
        "// characters assigned in later Unicode versions exactly like the reference library.",
    ]

    def emit(name, ranges):
        body = ", ".join(f"{{0x{a:X}, 0x{b:X}}}" for a, b in ranges) or "{0, -1}"
        lines.append(f"inline constexpr CodeRange {name}[] = {{{body}}};")

    emit("kWhiteSpace", classes["s"])
    for name in "LNPSM":
        cps = [c for a, b in classes[name] for c in range(a, b + 1) if unicodedata.category(chr(c)) == "Cn"]
        emit(f"kExtra{name}", to_ranges(cps))
    return "\n".join(lines) + "\n"


# ---- V4 chat rendering (rules of DeepSeek's encoding_dsv4.py; no tools) ----------------------------------
def render_chat(messages, thinking_mode="chat", drop_thinking=True, add_bos=True):
    """Returns [(text, role_of_segment)], role 'assistant' marks the trainable assistant turns."""
    assert thinking_mode in ("chat", "thinking")
    msgs = [dict(m) for m in messages]
    last_user = max((i for i, m in enumerate(msgs) if m["role"] in ("user", "developer")), default=-1)
    if thinking_mode == "thinking" and drop_thinking:
        kept = []
        for i, m in enumerate(msgs):
            if m["role"] in ("user", "system") or i >= last_user:
                kept.append(m)
            elif m["role"] == "assistant":
                m = dict(m)
                m.pop("reasoning_content", None)
                kept.append(m)
        msgs = kept
        last_user = max((i for i, m in enumerate(msgs) if m["role"] in ("user", "developer")), default=-1)
    segs = [(BOS, "prompt")] if add_bos else []
    for i, m in enumerate(msgs):
        role, content = m["role"], m.get("content") or ""
        if role == "system":
            segs.append((content, "prompt"))
        elif role in ("user", "developer"):
            segs.append((USER + content, "prompt"))
        elif role == "assistant":
            think = ""
            if thinking_mode == "thinking" and (not drop_thinking or i > last_user):
                think = (m.get("reasoning_content") or "") + THINK_END
            segs.append((think + content + EOS, "assistant"))
        else:
            raise ValueError(role)
        if i + 1 < len(msgs) and msgs[i + 1]["role"] != "assistant":
            continue
        if role in ("user", "developer"):
            if thinking_mode == "thinking" and (not drop_thinking or i >= last_user):
                segs.append((ASSISTANT + THINK, "prompt"))
            else:
                segs.append((ASSISTANT + THINK_END, "prompt"))
    return segs


def chat_conversations():
    convs = []
    for r in read_jsonl(ROOT / "data" / "chat.jsonl"):
        convs.append({"messages": r["messages"], "thinking_mode": r.get("thinking_mode", "chat"), "drop_thinking": True})
    multi = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4.", "reasoning_content": "2+2=4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6.", "reasoning_content": "3+3=6"},
    ]
    for mode in ("chat", "thinking"):
        for drop in (True, False):
            convs.append({"messages": multi, "thinking_mode": mode, "drop_thinking": drop})
    convs.append({"messages": multi[:4], "thinking_mode": "thinking", "drop_thinking": True})  # ends with a user turn
    convs.append({"messages": multi[:4], "thinking_mode": "chat", "drop_thinking": True})
    convs.append({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                               {"role": "assistant", "content": " spaced answer \n"}],
                  "thinking_mode": "chat", "drop_thinking": True})
    convs.append({"messages": [{"role": "developer", "content": "dev note"}, {"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "hello", "reasoning_content": "greet"},
                               {"role": "user", "content": "bye"},
                               {"role": "assistant", "content": "bye!", "reasoning_content": ""}],
                  "thinking_mode": "thinking", "drop_thinking": False})
    convs.append({"messages": [{"role": "user", "content": f"literal {THINK} and {EOS} in user text"},
                               {"role": "assistant", "content": "答案是 42。🙂"}],
                  "thinking_mode": "chat", "drop_thinking": True})
    return convs


def chat_case(tok: Tokenizer, conv):
    segs = render_chat(conv["messages"], conv["thinking_mode"], conv["drop_thinking"])
    text = "".join(s for s, _ in segs)
    spans, pos = [], 0
    for s, role in segs:
        if role == "assistant":
            spans.append((pos, pos + len(s)))
        pos += len(s)
    enc = tok.encode(text, add_special_tokens=False)
    mask = [int(any(a <= st < b for a, b in spans)) for st, _ in enc.offsets]
    return {**conv, "text": text, "ids": enc.ids, "mask": mask}


# ---- main --------------------------------------------------------------------------------------------
def dumps_jsonl(rows):
    return "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed files; exit 1 on a difference")
    args = ap.parse_args()
    if unicodedata.unidata_version != "14.0.0":
        sys.exit(f"needs Python 3.11 (unicodedata 14.0.0, as PCRE2 10.42); this one has {unicodedata.unidata_version}")

    outputs = {}
    tok = train_tokenizer()
    base_json = tok.to_str(pretty=True)
    outputs[FIX / "tokenizer.json"] = base_json
    outputs[ROOT / "data" / "tokenizer.json"] = base_json
    base = json.loads(base_json)
    variants = {"a": variant_a(base), "b": variant_b(base), "c": variant_c(base)}
    for name, j in variants.items():
        outputs[FIX / f"tokenizer_variant_{name}.json"] = json.dumps(j, ensure_ascii=False, indent=2) + "\n"

    classes = oniguruma_classes()
    outputs[FIX / "unicode_classes.json"] = json.dumps(
        {"oracle": f"tokenizers {tokenizers.__version__}", "classes": classes}) + "\n"
    outputs[ROOT / "src" / "data" / "unicode_extras.inc"] = extras_inc(classes)

    rng = random.Random(SEED)
    words = sorted({w for t in training_texts() for w in t.split() if len(w) < 20})
    extra_cps = [c for name in "LNPSM" for a, b in classes[name] for c in range(a, b + 1)
                 if unicodedata.category(chr(c)) == "Cn"][::97]
    texts = HAND_CASES + random_cases(rng, words, extra_cps, 200)
    long_text = "\n\n".join(training_texts())[:6000]
    texts.append(long_text)

    toks = {"base": tok}
    toks.update({name: Tokenizer.from_str(json.dumps(j)) for name, j in variants.items()})
    rows = []
    for i, t in enumerate(texts):
        row = {"i": i, "text": t}
        hand = i < len(HAND_CASES)
        for name, tk in toks.items():
            ids = tk.encode(t, add_special_tokens=False).ids
            row[name] = ids
            # Decoded text is stored where it differs from the input (absent = exact round trip); for the
            # variants only on the hand-written cases, to keep the file small.
            decoded = tk.decode(ids, skip_special_tokens=False)
            if decoded != t and (name == "base" or hand):
                row[name + "_decoded"] = decoded
            if name == "base":
                skipped = tk.decode(ids, skip_special_tokens=True)
                if skipped != decoded:
                    row["base_decoded_skip"] = skipped
            if name == "a" and hand:
                row["a_special"] = tk.encode(t, add_special_tokens=True).ids
        rows.append(row)
    outputs[FIX / "tokenizer_cases.jsonl"] = dumps_jsonl(rows)

    n_ids = max(tok.get_vocab(with_added_tokens=True).values()) + 1
    dec = []
    for i in range(300):
        ids = [rng.randrange(n_ids) for _ in range(rng.randint(1, 12))]
        if i % 50 == 0:
            ids.append(n_ids + 7)  # unknown id: dropped by the reference
        dec.append({"ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False),
                    "decoded_skip": tok.decode(ids, skip_special_tokens=True)})
    outputs[FIX / "decode_cases.jsonl"] = dumps_jsonl(dec)

    outputs[FIX / "chat_cases.jsonl"] = dumps_jsonl([chat_case(tok, c) for c in chat_conversations()])

    differ = []
    for path, content in outputs.items():
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != content:
                differ.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content, encoding="utf-8")
    if args.check:
        for p in differ:
            print(f"differs: {p.relative_to(ROOT)}")
        sys.exit(1 if differ else 0)
    print(f"tokenizers {tokenizers.__version__}: vocab {n_ids} ids, {len(rows)} text cases, {len(dec)} decode cases,"
          f" {len(chat_conversations())} chats; wrote {len(outputs)} files")


if __name__ == "__main__":
    main()
