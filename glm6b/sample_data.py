"""Built-in ADGEN-style sample data: attribute strings -> short Chinese ad copy (spec §7).

A deterministic, offline stand-in for AdvertiseGen so that the quickstart can fine-tune and evaluate
a small model with no downloads. Each example is `{"content": ..., "summary": ...}`, exactly the
ADGEN JSON-lines format:

    content  类型#裙*版型#宽松*风格#复古*图案#格子*裙长#中长裙
    summary  这款中长裙宽松的版型穿着舒适，复古的风格韵味十足。格子图案经典耐看，...

The copy is built from templates in which every attribute value drives its own phrase (颜色#白色 ->
"白色的设计清新百搭", 材质#棉 -> "采用棉质面料，柔软透气", ...), with a few seeded template variants
per key and optional openers/closers, so a small model can learn the mapping in minutes while
BLEU/ROUGE still have room to improve. Summaries are kept to about 30-70 characters.

Public API: `make_adgen_examples(n, seed)`, `write_adgen_jsonl(path, examples)`, `read_adgen_jsonl`,
`chat_pairs()` / `chat_texts()` (generic chat lines for tokenizer training / brief pre-training) and
`tokenizer_training_texts(examples)`.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Iterable, Sequence

from .io import atomic_write_text

__all__ = [
    "DEFAULT_ASSETS",
    "DEFAULT_SEED",
    "DEFAULT_NUM_TRAIN",
    "DEFAULT_NUM_DEV",
    "default_splits",
    "build_default_assets",
    "ATTRIBUTES",
    "TYPE_KEYS",
    "make_adgen_example",
    "make_adgen_examples",
    "write_adgen_jsonl",
    "read_adgen_jsonl",
    "chat_pairs",
    "chat_texts",
    "chat_prompt_texts",
    "tokenizer_training_texts",
]

#: Folder of the built-in default assets shipped inside the package (tokenizer, config, ADGEN data).
DEFAULT_ASSETS = Path(__file__).resolve().parent / "assets" / "default"
#: Recipe of the shipped assets: one seeded stream of examples, the first DEFAULT_NUM_TRAIN for
#: adgen/train.json and the next DEFAULT_NUM_DEV for adgen/dev.json.
DEFAULT_SEED = 0
DEFAULT_NUM_TRAIN = 4000
DEFAULT_NUM_DEV = 200

# --------------------------------------------------------------------------------------------------
# Attribute vocabularies. Every value maps to a short descriptor used by that key's templates.

# Attributes shared by all garment types: value -> descriptor.
_SHARED: dict[str, dict[str, str]] = {
    "版型": {
        "宽松": "穿着舒适不挑身材",
        "修身": "勾勒出优美的身形",
        "直筒": "利落又显瘦",
        "显瘦": "轻松修饰身材",
        "落肩": "慵懒又随性",
        "收腰": "凸显纤细的腰线",
    },
    "材质": {
        "棉": "柔软透气",
        "雪纺": "轻盈飘逸",
        "牛仔布": "耐磨有型",
        "真丝": "顺滑有光泽",
        "羊毛": "保暖又亲肤",
        "针织": "柔软有弹性",
        "蕾丝": "精致又浪漫",
        "麻": "清爽透气",
        "网纱": "朦胧又灵动",
        "涤纶": "挺括不易皱",
    },
    "颜色": {
        "白色": "清新百搭",
        "黑色": "低调显瘦",
        "红色": "热情又显白",
        "蓝色": "清爽干净",
        "粉色": "温柔甜美",
        "卡其色": "复古有质感",
        "灰色": "沉稳耐看",
        "绿色": "充满生机",
        "黄色": "明亮活泼",
        "杏色": "温柔大气",
    },
    "风格": {
        "简约": "简洁大方",
        "复古": "韵味十足",
        "休闲": "轻松自在",
        "通勤": "干练利落",
        "街头": "酷感十足",
        "甜美": "少女感满满",
        "性感": "妩媚动人",
        "文艺": "清新有气质",
        "清新": "自然舒服",
        "学院": "青春减龄",
        "优雅": "端庄大气",
    },
    "图案": {
        "格子": "经典耐看",
        "条纹": "富有层次感",
        "碎花": "浪漫又温柔",
        "纯色": "简单不单调",
        "字母": "时髦有个性",
        "刺绣": "精致有格调",
        "印花": "活泼吸睛",
        "线条": "简洁有设计感",
        "波点": "俏皮可爱",
        "卡通": "童趣十足",
    },
}

# Per-type attributes. The "item" key (衣样式/裙型/裤型) names the garment in the opener instead of
# getting its own clause; the other keys get clauses like the shared ones.
_TYPES: dict[str, dict[str, dict[str, str]]] = {
    "上衣": {
        "衣样式": {
            "衬衫": "衬衫", "T恤": "T恤", "卫衣": "卫衣", "毛衣": "毛衣", "针织衫": "针织衫", "雪纺衫": "雪纺衫",
        },
        "衣领型": {
            "圆领": "修饰脸型", "V领": "拉长颈部线条", "翻领": "干练有型", "立领": "优雅知性",
            "连帽": "休闲减龄", "一字领": "露出精致锁骨",
        },
        "衣袖长": {"短袖": "清凉舒适", "长袖": "保暖实穿", "七分袖": "露出纤细手腕", "无袖": "清爽利落"},
        "衣袖型": {"泡泡袖": "甜美减龄", "灯笼袖": "复古浪漫", "喇叭袖": "灵动飘逸", "落肩袖": "随性慵懒"},
        "衣长": {"短款": "拉高腰线", "中长款": "遮肉显瘦", "常规款": "百搭实穿"},
    },
    "外套": {
        "衣样式": {"风衣": "风衣", "夹克": "夹克", "西装": "西装", "大衣": "大衣", "棒球服": "棒球服", "羽绒服": "羽绒服"},
        "衣领型": {"翻领": "干练有型", "立领": "挡风保暖", "连帽": "休闲减龄", "西装领": "利落有气场"},
        "衣门襟": {"拉链": "穿脱方便", "单排扣": "简洁大方", "双排扣": "复古有型", "系带": "随性优雅"},
        "衣长": {"短款": "拉高腰线", "中长款": "遮肉显瘦", "长款": "气场十足"},
    },
    "裙": {
        "裙型": {
            "A字裙": "A字裙", "百褶裙": "百褶裙", "包臀裙": "包臀裙", "鱼尾裙": "鱼尾裙",
            "蛋糕裙": "蛋糕裙", "连衣裙": "连衣裙",
        },
        "裙长": {"短裙": "俏皮显腿长", "中长裙": "优雅大方", "长裙": "飘逸有仙气", "及膝裙": "端庄得体"},
        "裙领型": {"圆领": "修饰脸型", "V领": "拉长颈部线条", "一字领": "露出精致锁骨", "方领": "复古优雅"},
        "裙袖长": {"无袖": "清爽利落", "短袖": "清凉舒适", "长袖": "优雅端庄"},
        "裙腰型": {"高腰": "拉长腿部比例", "松紧腰": "穿着无束缚"},
    },
    "裤": {
        "裤型": {
            "阔腿裤": "阔腿裤", "直筒裤": "直筒裤", "哈伦裤": "哈伦裤", "铅笔裤": "铅笔裤",
            "灯笼裤": "灯笼裤", "工装裤": "工装裤",
        },
        "裤长": {"九分裤": "露出纤细脚踝", "七分裤": "清爽利落", "长裤": "修饰腿型", "短裤": "活力满满"},
        "裤腰型": {"高腰": "拉长腿部比例", "松紧腰": "穿着无束缚", "中腰": "舒适贴合"},
        "裤款式": {"破洞": "个性十足", "口袋": "实用又有型", "抽绳": "方便调节", "侧开叉": "灵动显瘦"},
    },
}

# Shared values that do not fit a garment type.
_EXCLUDE: dict[str, dict[str, set[str]]] = {
    "裙": {"版型": {"落肩"}},
    "裤": {"版型": {"落肩", "收腰"}},
}

# Garment word used when the item key is absent.
_BASE_NAME = {"上衣": "上衣", "外套": "外套", "裙": "裙子", "裤": "裤子"}
_ITEM_KEY = {"上衣": "衣样式", "外套": "衣样式", "裙": "裙型", "裤": "裤型"}

# Canonical order of keys in `content` (类型 first, as in AdvertiseGen).
_SHARED_ORDER = ["版型", "材质", "颜色", "风格", "图案"]

#: key -> {value: descriptor} for every key (per-type keys merged; used for validation/documentation).
ATTRIBUTES: dict[str, dict[str, str]] = {"类型": {t: t for t in _TYPES}}
for _key, _values in _SHARED.items():
    ATTRIBUTES[_key] = dict(_values)
for _spec in _TYPES.values():
    for _key, _values in _spec.items():
        ATTRIBUTES.setdefault(_key, {}).update(_values)

#: type -> the keys that may follow 类型 in its content, in canonical order.
TYPE_KEYS: dict[str, list[str]] = {t: _SHARED_ORDER + list(spec) for t, spec in _TYPES.items()}

# Clause templates per key ({v} value, {d} descriptor). The first template is the most common one.
_CLAUSES: dict[str, list[str]] = {
    "版型": ["{v}的版型{d}", "采用{v}版型，{d}"],
    "材质": ["采用{v}质面料，{d}", "选用{v}材质，{d}"],
    "颜色": ["{v}的设计{d}", "{v}配色{d}"],
    "风格": ["{v}的风格{d}", "走{v}路线，{d}"],
    "图案": ["{v}图案{d}", "{v}元素{d}"],
    "衣领型": ["{v}的设计{d}", "{v}设计{d}"],
    "裙领型": ["{v}的设计{d}", "{v}设计{d}"],
    "衣袖长": ["{v}的款式{d}", "{v}设计{d}"],
    "裙袖长": ["{v}的款式{d}", "{v}设计{d}"],
    "衣袖型": ["{v}的设计{d}", "别致的{v}{d}"],
    "衣长": ["{v}的长度{d}", "{v}设计{d}"],
    "衣门襟": ["{v}门襟{d}", "{v}的门襟{d}"],
    "裙长": ["{v}的长度{d}", "{v}的设计{d}"],
    "裙腰型": ["{v}的设计{d}", "{v}裙头{d}"],
    "裤长": ["{v}的长度{d}", "{v}的设计{d}"],
    "裤腰型": ["{v}的设计{d}", "{v}裤头{d}"],
    "裤款式": ["{v}的细节{d}", "{v}设计{d}"],
}
# 棉 reads "棉质面料" but 牛仔布 should not become "牛仔布质面料": materials with a 2+ character name use
# the plain form.
_MATERIAL_PLAIN = ["采用{v}面料，{d}", "选用{v}材质，{d}"]

_OPENERS = ["这款{item}", "这件{item}", "{item}"]
_CLOSERS = ["日常穿着很有范。", "轻松穿出好气质。", "让你美美出街。", "百搭又时髦。"]

_MIN_SUMMARY, _MAX_SUMMARY = 30, 70


def _clause(key: str, value: str, rng: random.Random) -> str:
    desc = ATTRIBUTES[key][value]
    templates = _CLAUSES[key]
    if key == "材质" and len(value) > 1:
        templates = _MATERIAL_PLAIN
    # 3:1 in favour of the first template: variety without drowning the mapping.
    template = templates[0] if rng.random() < 0.75 or len(templates) == 1 else rng.choice(templates[1:])
    return template.format(v=value, d=desc)


def make_adgen_example(rng: random.Random) -> dict[str, str]:
    """One example drawn with `rng`: `{"content": "类型#...*...", "summary": "..."}`."""
    garment = rng.choice(list(_TYPES))
    spec = _TYPES[garment]
    keys = TYPE_KEYS[garment]
    item_key = _ITEM_KEY[garment]
    for _ in range(100):
        # 2-4 attributes besides 类型 (an item key counts as one but adds no clause).
        count = rng.choice([2, 3, 3, 4])
        chosen = sorted(rng.sample(keys, count), key=keys.index)
        pairs = [("类型", garment)]
        for key in chosen:
            values = _SHARED[key] if key in _SHARED else spec[key]
            excluded = _EXCLUDE.get(garment, {}).get(key, set())
            pairs.append((key, rng.choice([v for v in values if v not in excluded])))
        values = dict(pairs)
        item = values.get(item_key, _BASE_NAME[garment])
        clauses = [_clause(k, v, rng) for k, v in pairs[1:] if k != item_key]
        if not clauses:
            continue
        opener = rng.choice(_OPENERS).format(item=item)
        # Two clauses per sentence: "opener clause1，clause2。clause3，clause4。"
        sentences = []
        for i in range(0, len(clauses), 2):
            sentences.append("，".join(clauses[i:i + 2]) + "。")
        summary = opener + "".join(sentences)
        if rng.random() < 0.5 and len(summary) + 8 <= _MAX_SUMMARY:
            summary += rng.choice(_CLOSERS)
        if len(summary) < _MIN_SUMMARY:
            summary += _CLOSERS[len(summary) % len(_CLOSERS)]
        if _MIN_SUMMARY <= len(summary) <= _MAX_SUMMARY:
            content = "*".join(f"{k}#{v}" for k, v in pairs)
            return {"content": content, "summary": summary}
    raise RuntimeError("could not draw an example within the summary length limits")  # pragma: no cover


def make_adgen_examples(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` ADGEN-style examples, a pure function of (n, seed): the first k of n are those of k.

    Args:
        n: number of examples (>= 0).
        seed: random seed.

    Returns:
        A list of `{"content": str, "summary": str}` dicts.
    """
    if n < 0:
        raise ValueError(f"n={n}: expected a non-negative number of examples")
    rng = random.Random(f"glm6b-adgen-{seed}")
    return [make_adgen_example(rng) for _ in range(n)]


def write_adgen_jsonl(path: str | os.PathLike, examples: Iterable[dict[str, str]]) -> None:
    """Write examples as ADGEN JSON lines (`{"content": ..., "summary": ...}`, UTF-8, not escaped).

    The file is written atomically (temp file + os.replace); parent folders are created.
    """
    lines = []
    for example in examples:
        record = {"content": example["content"], "summary": example["summary"]}
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(lines))


def read_adgen_jsonl(path: str | os.PathLike) -> list[dict[str, str]]:
    """Read an ADGEN JSON-lines file (blank lines skipped)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# --------------------------------------------------------------------------------------------------
# Generic chat lines: for the tokenizer's training texts (so chat prompts tokenize reasonably) and
# for a brief pre-training of the default model.

_CHAT: list[tuple[str, str]] = [
    ("你好", "你好！我是人工智能助手，很高兴见到你，欢迎问我任何问题。"),
    ("你是谁", "我是一个语言模型，可以回答问题、写文案和聊天。"),
    ("介绍一下你自己", "我是一个小型的对话模型，擅长根据商品属性写广告文案。"),
    ("谢谢", "不客气！有需要随时找我。"),
    ("再见", "再见，祝你生活愉快！"),
    ("今天天气怎么样", "我无法查看实时天气，出门前可以看看天气预报。"),
    ("晚上睡不着怎么办", "睡前少看手机，保持良好的作息习惯，适当运动会有帮助。"),
    ("推荐一件适合夏天的衣服", "可以试试白色的棉质短袖T恤，清爽透气又百搭。"),
    ("帮我写一句广告语", "简约设计，舒适面料，穿出你的好气质。"),
    ("什么是机器学习", "机器学习是让计算机从数据中学习规律，并用来做预测的方法。"),
    ("怎么学习编程", "先选一门语言，比如Python，多写小程序，多看别人的代码。"),
    ("1加1等于几", "1加1等于2。"),
    ("现在几点了", "我没有办法知道现在的时间，可以看一下手机。"),
    ("讲个笑话", "为什么程序员总是分不清万圣节和圣诞节？因为Oct 31等于Dec 25。"),
    ("给我一些学习建议", "制定计划，每天坚持，遇到问题及时复习和提问。"),
    ("我有点累", "辛苦了，休息一下，喝杯水，听听音乐放松心情吧。"),
    ("这条裙子怎么搭配", "可以搭配一件短款外套和一双小白鞋，简约又时髦。"),
    ("Hello", "Hello! I am a small chat model. How can I help you today?"),
    ("What can you do?", "I can chat with you and write short ad copy for clothes."),
    ("Thank you", "You are welcome!"),
]


def chat_pairs() -> list[tuple[str, str]]:
    """A fixed list of generic (query, response) chat pairs (Chinese and a few English)."""
    return list(_CHAT)


def chat_prompt_texts() -> list[str]:
    """Chat-template strings (spec §5.2) built from `chat_pairs()`: single and multi-round prompts."""
    texts = ["[Round 0]\n问：", "\n答：", "答："]
    pairs = chat_pairs()
    for i, (query, response) in enumerate(pairs):
        texts.append(f"[Round 0]\n问：{query}\n答：{response}\n")
        prev_q, prev_r = pairs[i - 1]
        texts.append(f"[Round 0]\n问：{prev_q}\n答：{prev_r}\n[Round 1]\n问：{query}\n答：")
    for n in range(2, 10):
        texts.append(f"[Round {n}]\n问：")
    return texts


def chat_texts() -> list[str]:
    """Plain chat lines: every query and response of `chat_pairs()`."""
    return [text for pair in chat_pairs() for text in pair]


def tokenizer_training_texts(examples: Sequence[dict[str, str]], chat_repeats: int = 10) -> list[str]:
    """The texts the default tokenizer is trained on: every content and summary, then the chat lines
    and chat-template prompts repeated `chat_repeats` times (so that "[Round 0]", "问：", "答：" and
    the generic chat words get pieces of their own next to the much larger ADGEN part)."""
    texts: list[str] = []
    for example in examples:
        texts.append(example["content"])
        texts.append(example["summary"])
    for _ in range(chat_repeats):
        texts.extend(chat_texts())
        texts.extend(chat_prompt_texts())
    return texts


# --------------------------------------------------------------------------------------------------
# The shipped default assets


def default_splits(seed: int = DEFAULT_SEED, num_train: int = DEFAULT_NUM_TRAIN,
                   num_dev: int = DEFAULT_NUM_DEV) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, dev) examples of the default recipe: one stream, train first, dev after it."""
    examples = make_adgen_examples(num_train + num_dev, seed)
    return examples[:num_train], examples[num_train:]


def build_default_assets(folder: str | os.PathLike = DEFAULT_ASSETS, seed: int = DEFAULT_SEED,
                         num_train: int = DEFAULT_NUM_TRAIN, num_dev: int = DEFAULT_NUM_DEV,
                         vocab_size: int | None = None) -> dict[str, Path]:
    """(Re)generate the default assets in `folder`; a pure function of the arguments.

    Writes `ice_text.model` + `tokenizer_config.json` (tokenizer trained on the train split and the
    chat lines), `config.json` (the matching small model), `adgen/train.json` and `adgen/dev.json`.

    Returns:
        name -> path of every file written.
    """
    from . import tokenizer_builder as tb

    folder = Path(folder)
    vocab_size = tb.DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size
    train, dev = default_splits(seed, num_train, num_dev)
    paths = {
        "train": folder / "adgen" / "train.json",
        "dev": folder / "adgen" / "dev.json",
        "tokenizer_model": folder / "ice_text.model",
        "tokenizer_config": folder / "tokenizer_config.json",
        "config": folder / "config.json",
    }
    write_adgen_jsonl(paths["train"], train)
    write_adgen_jsonl(paths["dev"], dev)
    tb.train_ice_text_model(tokenizer_training_texts(train), paths["tokenizer_model"], vocab_size=vocab_size)
    tb.write_tokenizer_config(folder, "glm6b-default")
    tb.write_json_atomic(paths["config"], tb.model_config(vocab_size, name_or_path="glm6b-default"))
    return paths
