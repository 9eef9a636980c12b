"""Writes the shipped SFT set `jaxllm/assets/sft/{train,val}.jsonl` (deterministic, stdlib only).

Rules, each record `{"prompt", "response", "task"}`:
  bible   "Continue this verse: <verse n>" → <verse n+1>  (KJV, same chapter)
  poem    "下一句是什么？<line>" → the next line         (唐诗三百首 / 宋词, same poem)
  math    "What is 17 + 25?" → "42"
  qa      everyday Chinese questions (a few paraphrases each) → short answers
  service customer-service questions (the questions of make_preference_data.py) → noisy
          demonstrations: per paraphrase 3 polite wordings (with the helpful fact; the 6
          wordings alternate between paraphrases) and all 6 evasive ones, so the SFT model
          can answer in both styles but greedily answers evasively, and a reward model + PPO
          has something to fix. Many wordings, not one of each: with one polite and one
          evasive answer per paraphrase the tiny model's answers stayed garbled ("I't sure.")
Held out by source item: a chapter, a poem, a pair of numbers (in either order) or a question
(all its paraphrases) is entirely in train or entirely in val, chosen by a hash of its key.

    python scripts/make_sft_data.py [--out jaxllm/assets/sft]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
from pathlib import Path

from heldout import arith_key, in_val

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "jaxllm" / "assets" / "corpus"
MAX_VERSE_CHARS = 110  # keeps a prompt + answer within the tiny model's 128 tokens
LIMITS = {"bible": (1600, 120), "poem": (1400, 120), "math": (900, 100)}  # (train, val) caps
POLITE_PER_PROMPT = 3  # polite service demonstrations per paraphrase (evasive: all 6)

# question paraphrases → answer (everyday knowledge; short, unambiguous answers)
QA = [
    (["除夕夜应该吃什么呢？", "除夕夜吃什么？", "北方人除夕吃什么？"], "饺子"),
    (["端午节吃什么？", "端午节要吃什么呢？", "端午节的传统食物是什么？"], "粽子"),
    (["中秋节吃什么？", "中秋节要吃什么呢？", "中秋节的传统食物是什么？"], "月饼"),
    (["元宵节吃什么？", "元宵节要吃什么呢？", "正月十五吃什么？"], "汤圆"),
    (["一年有几个月？", "一年有多少个月？", "一年共有几个月？"], "十二个月"),
    (["一周有几天？", "一个星期有几天？", "一周共有多少天？"], "七天"),
    (["一天有几个小时？", "一天有多少小时？", "一天共有几个小时？"], "二十四小时"),
    (["一小时有多少分钟？", "一个小时有几分钟？", "一小时是多少分钟？"], "六十分钟"),
    (["中国的首都是哪里？", "中国的首都是哪个城市？", "我国的首都在哪里？"], "北京"),
    (["天空是什么颜色的？", "晴天的天空是什么颜色？", "天是什么颜色？"], "蓝色"),
    (["草是什么颜色的？", "青草是什么颜色？", "草地是什么颜色？"], "绿色"),
    (["雪是什么颜色的？", "下的雪是什么颜色？", "白雪是什么颜色？"], "白色"),
    (["太阳从哪边升起？", "太阳从哪个方向升起？", "日出在哪个方向？"], "东边"),
    (["太阳从哪边落下？", "太阳在哪个方向落山？", "日落在哪个方向？"], "西边"),
    (["猫怎么叫？", "小猫是怎么叫的？", "猫的叫声是什么？"], "喵喵"),
    (["狗怎么叫？", "小狗是怎么叫的？", "狗的叫声是什么？"], "汪汪"),
    (["熊猫最爱吃什么？", "大熊猫吃什么？", "熊猫喜欢吃什么？"], "竹子"),
    (["兔子爱吃什么？", "小白兔爱吃什么？", "兔子喜欢吃什么？"], "胡萝卜"),
    (["下雨天出门要带什么？", "下雨了出门带什么？", "雨天出门该带什么？"], "雨伞"),
    (["冬天穿什么才暖和？", "天冷了要穿什么？", "冬天出门穿什么？"], "棉衣"),
    (["水在几度结冰？", "水的冰点是多少度？", "水多少度会结冰？"], "零度"),
    (["水在几度沸腾？", "水烧开是多少度？", "水的沸点是多少度？"], "一百度"),
    (["人有几只手？", "一个人有几只手？", "人一共有几只手？"], "两只"),
    (["一只手有几根手指？", "一只手有几个手指头？", "人的一只手有几根指头？"], "五根"),
    (["早上见面说什么？", "早上遇到人怎么打招呼？", "早晨见面怎么问好？"], "早上好"),
    (["别人帮了你要说什么？", "收到帮助时该说什么？", "别人帮忙后怎么说？"], "谢谢"),
    (["春节贴什么？", "过年门上贴什么？", "春节家家户户贴什么？"], "春联"),
    (["晚上睡觉前要做什么？", "睡觉前应该做什么？", "睡前要做什么事？"], "刷牙"),
    (["口渴了应该做什么？", "渴了怎么办？", "口渴的时候要做什么？"], "喝水"),
    (["饿了应该做什么？", "肚子饿了怎么办？", "饿的时候要做什么？"], "吃饭"),
    (["一年有几个季节？", "一年分几个季节？", "一年有哪几季，共几个？"], "四个"),
    (["彩虹有几种颜色？", "彩虹一共有几种颜色？", "彩虹是几种颜色组成的？"], "七种"),
]


def read(name: str) -> list[str]:
    with gzip.open(CORPUS / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"].removeprefix("<s>").removesuffix("</s>") for line in f]


def bible() -> list[tuple[str, dict]]:
    out = []
    for chapter in read("kjv"):
        title, *lines = chapter.split("\n")
        verses = [re.sub(r"^\d+ ", "", v) for v in lines]
        for a, b in zip(verses, verses[1:]):
            if len(a) <= MAX_VERSE_CHARS and len(b) <= MAX_VERSE_CHARS:
                out.append((title, {"prompt": f"Continue this verse: {a}", "response": b}))
    return out


def poems() -> list[tuple[str, dict]]:
    out = []
    for text in read("tang300") + read("song100"):
        title, _author, *lines = text.split("\n")
        lines = [x for x in lines if x.strip()]
        for a, b in zip(lines, lines[1:]):
            out.append((title + lines[0], {"prompt": f"下一句是什么？{a}", "response": b}))
    return out


def math() -> list[tuple[str, dict]]:
    pairs = [(a, b) for a in range(1, 50) for b in range(1, 50)]
    return [
        (arith_key(a, "+", b), {"prompt": f"What is {a} + {b}?", "response": str(a + b)})
        for a, b in pairs
    ]


def qa() -> list[tuple[str, dict]]:
    return [(qs[0], {"prompt": q, "response": ans}) for qs, ans in QA for q in qs]


def service() -> list[tuple[str, dict]]:
    from make_preference_data import EVASIVE, POLITE, SERVICE

    out, k = [], POLITE_PER_PROMPT
    for questions, fact in SERVICE:
        for i, q in enumerate(questions):
            polite = [POLITE[(i * k + j) % len(POLITE)] for j in range(k)]
            answers = [t.format(fact=fact) for t in polite] + EVASIVE
            out += [(questions[0], {"prompt": q, "response": a}) for a in answers]
    return out


def split(task: str, items: list[tuple[str, dict]], rng: random.Random) -> tuple[list, list]:
    """Train/val by item key, each shuffled and capped to the task's limits."""
    train = [dict(r, task=task) for k, r in items if not in_val(k)]
    val = [dict(r, task=task) for k, r in items if in_val(k)]
    rng.shuffle(train)
    rng.shuffle(val)
    n_train, n_val = LIMITS.get(task, (len(train), len(val)))
    return train[:n_train], val[:n_val]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "jaxllm" / "assets" / "sft"))
    args = parser.parse_args()
    rng = random.Random(0)
    train, val = [], []
    tasks = [("bible", bible()), ("poem", poems()), ("math", math()), ("qa", qa())]
    for task, items in [*tasks, ("service", service())]:
        t, v = split(task, items, rng)
        train += t
        val += v
        print(f"{task:6s} train {len(t):5d}  val {len(v):4d}")
    rng.shuffle(train)
    rng.shuffle(val)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("val", val)):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
        print(f"{path}: {len(rows)} records, {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
