"""The synthetic conversations tiny-chat learns from, and the held-out questions it is graded on.

Every question kind has several paraphrase templates; the last one or two of
each kind are *held out*: never seen in training, used only by evaluate.py.
Facts themselves (every capital, every sum) do appear in training, so the
evaluation measures whether the model understood a new phrasing.
"""
from __future__ import annotations

import random

IDENTITY = "I am tiny-chat, a small demo model trained for the qwen-lab tutorial. I can answer simple questions."
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# (country, capital, country in Traditional Chinese, capital in Traditional Chinese)
CAPITALS = [
    ("France", "Paris", "法國", "巴黎"), ("Italy", "Rome", "義大利", "羅馬"), ("Germany", "Berlin", "德國", "柏林"),
    ("Spain", "Madrid", "西班牙", "馬德里"), ("Portugal", "Lisbon", "葡萄牙", "里斯本"),
    ("Japan", "Tokyo", "日本", "東京"), ("China", "Beijing", "中國", "北京"), ("India", "New Delhi", "印度", "新德里"),
    ("Canada", "Ottawa", "加拿大", "渥太華"), ("Mexico", "Mexico City", "墨西哥", "墨西哥城"),
    ("Brazil", "Brasilia", "巴西", "巴西利亞"), ("Argentina", "Buenos Aires", "阿根廷", "布宜諾斯艾利斯"),
    ("Peru", "Lima", "秘魯", "利馬"), ("Chile", "Santiago", "智利", "聖地牙哥"), ("Egypt", "Cairo", "埃及", "開羅"),
    ("Kenya", "Nairobi", "肯亞", "奈洛比"), ("Nigeria", "Abuja", "奈及利亞", "阿布加"),
    ("Russia", "Moscow", "俄羅斯", "莫斯科"), ("Poland", "Warsaw", "波蘭", "華沙"),
    ("Austria", "Vienna", "奧地利", "維也納"), ("Greece", "Athens", "希臘", "雅典"),
    ("Sweden", "Stockholm", "瑞典", "斯德哥爾摩"), ("Norway", "Oslo", "挪威", "奧斯陸"),
    ("Finland", "Helsinki", "芬蘭", "赫爾辛基"), ("Denmark", "Copenhagen", "丹麥", "哥本哈根"),
    ("Ireland", "Dublin", "愛爾蘭", "都柏林"), ("Belgium", "Brussels", "比利時", "布魯塞爾"),
    ("Netherlands", "Amsterdam", "荷蘭", "阿姆斯特丹"), ("Switzerland", "Bern", "瑞士", "伯恩"),
    ("Turkey", "Ankara", "土耳其", "安卡拉"), ("Iran", "Tehran", "伊朗", "德黑蘭"),
    ("Thailand", "Bangkok", "泰國", "曼谷"), ("Vietnam", "Hanoi", "越南", "河內"),
    ("South Korea", "Seoul", "南韓", "首爾"), ("Indonesia", "Jakarta", "印尼", "雅加達"),
    ("Australia", "Canberra", "澳洲", "坎培拉"), ("New Zealand", "Wellington", "紐西蘭", "威靈頓"),
    ("Cuba", "Havana", "古巴", "哈瓦那"), ("Colombia", "Bogota", "哥倫比亞", "波哥大"),
    ("Morocco", "Rabat", "摩洛哥", "拉巴特"), ("Hungary", "Budapest", "匈牙利", "布達佩斯"),
    ("Philippines", "Manila", "菲律賓", "馬尼拉"),
]

PLANETS = ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth"]

# (animal, legs, sound)
ANIMALS = [("dog", "four", "woof"), ("cat", "four", "meow"), ("cow", "four", "moo"), ("duck", "two", "quack"),
           ("sheep", "four", "baa"), ("horse", "four", "neigh"), ("chicken", "two", "cluck"),
           ("spider", "eight", None), ("ant", "six", None), ("bird", "two", "tweet"), ("frog", "four", "croak"),
           ("lion", "four", "roar"), ("owl", "two", "hoot"), ("bee", "six", "buzz")]

CONCEPTS = {
    "tokenizer": "A tokenizer turns text into token ids and back. Qwen uses byte-level BPE, so any text can be encoded.",
    "chat template": "A chat template is a Jinja program that turns a list of messages into the one prompt string "
                     "the model was trained on, with <|im_start|> and <|im_end|> around each turn.",
    "add_generation_prompt": "add_generation_prompt adds the header of the assistant turn at the end of the prompt, "
                             "so the model writes the answer instead of a role name.",
    "EOS": "EOS means end of sequence. Generation stops when the model emits one of the EOS ids; for a chat model "
           "that includes <|im_end|>, not only <|endoftext|>.",
    "KV cache": "The KV cache keeps the keys and values of earlier tokens, so each new token costs one step "
                "instead of running the whole sequence again.",
    "temperature": "Temperature divides the logits before sampling. Low values make the output focused, high "
                   "values make it more random; zero means always the most likely token.",
    "top-p": "Top-p keeps the smallest set of tokens whose probabilities add up to p, then samples among them.",
    "top-k": "Top-k keeps only the k most likely tokens before sampling.",
    "repetition penalty": "The repetition penalty lowers the scores of tokens that already appeared, so the model "
                          "repeats itself less.",
}

# Paraphrase templates: all but the held-out ones (the last `HELD_OUT` of each list) are used for training.
HELD_OUT = 2
Q_CAPITAL = ["What is the capital of {c}?", "What's the capital of {c}?", "Tell me the capital of {c}.",
             "Which city is the capital of {c}?", "capital of {c}?", "What is the capital city of {c}?",
             "Do you know the capital of {c}?", "Name the capital of {c}."]
Q_ADD = ["What is {a} plus {b}?", "What is {a} + {b}?", "Add {a} and {b}.", "How much is {a} plus {b}?",
         "Compute {a} + {b}.", "{a} + {b} = ?", "What do you get if you add {a} and {b}?", "Calculate {a} plus {b}."]
Q_SUB = ["What is {a} minus {b}?", "What is {a} - {b}?", "Subtract {b} from {a}.", "How much is {a} minus {b}?",
         "Compute {a} - {b}.", "{a} - {b} = ?", "What do you get if you take {b} from {a}?",
         "Calculate {a} minus {b}."]
Q_PLANET = ["Which planet is {o} from the Sun?", "What is the {o} planet from the Sun?",
            "Name the {o} planet from the Sun.", "Counting from the Sun, which planet is {o}?",
            "Which planet comes {o} from the Sun?", "Tell me the {o} planet from the Sun."]
Q_LEGS = ["How many legs does a {a} have?", "How many legs has a {a}?", "Count the legs of a {a}.",
          "A {a} has how many legs?", "Tell me how many legs a {a} has.", "What number of legs does a {a} have?"]
Q_SOUND = ["What sound does a {a} make?", "What does a {a} say?", "Which sound does a {a} make?",
           "How does a {a} sound?", "Tell me the sound a {a} makes.", "What noise does a {a} make?"]
Q_CONCEPT = ["What is {k}?", "Explain {k}.", "What does {k} mean?", "Can you explain {k}?", "Tell me about {k}."]
Q_GREET = ["Hi", "Hello!", "Hello, who are you?", "Who are you?", "What is your name?", "Hey there", "Good morning!",
           "Introduce yourself."]
Q_CAPITAL_ZH = ["{c}的首都是哪裡？", "{c}的首都是什麼？", "請問{c}的首都？", "告訴我{c}的首都。"]
Q_ADD_ZH = ["{a} 加 {b} 等於多少？", "{a} 加 {b} 是多少？", "請計算 {a} 加 {b}。", "{a} 加上 {b} 是多少？"]
Q_GREET_ZH = ["你好", "你是誰？", "請自我介紹。", "早安！"]
IDENTITY_ZH = "你好！我是 tiny-chat，一個為 qwen-lab 教學訓練的小型示範模型。"

CUSTOM_SYSTEMS = {
    "You are a pirate. Answer like a pirate.": lambda a: "Arr! " + a + " Arr, matey!",
    "Answer in capital letters only.": lambda a: a.upper(),
    "Be brief and polite. Start every answer with 'Sure!'": lambda a: "Sure! " + a,
}


def train_part(templates: list[str]) -> list[str]:
    return templates[:-HELD_OUT]


def held_out(templates: list[str]) -> list[str]:
    return templates[-HELD_OUT:]


def qa_items(split: str, rng: random.Random) -> list[tuple[str, str, str]]:
    """(kind, question, answer) for every fact, phrased with the split's templates."""
    pick = train_part if split == "train" else held_out
    items = []
    for country, capital, _, _ in CAPITALS:
        for t in pick(Q_CAPITAL):
            items.append(("capital", t.format(c=country), f"The capital of {country} is {capital}."))
    for a in range(21):
        for b in range(21):
            t = rng.choice(pick(Q_ADD))
            items.append(("add", t.format(a=a, b=b), f"{a} plus {b} is {a + b}."))
            if a >= b:
                t = rng.choice(pick(Q_SUB))
                items.append(("sub", t.format(a=a, b=b), f"{a} minus {b} is {a - b}."))
    for i, planet in enumerate(PLANETS):
        for t in pick(Q_PLANET):
            items.append(("planet", t.format(o=ORDINALS[i]), f"{planet} is the {ORDINALS[i]} planet from the Sun."))
    for animal, legs, sound in ANIMALS:
        for t in pick(Q_LEGS):
            items.append(("legs", t.format(a=animal), f"A {animal} has {legs} legs."))
        if sound:
            for t in pick(Q_SOUND):
                items.append(("sound", t.format(a=animal), f"A {animal} says {sound}."))
    return items


def chinese_items(rng: random.Random) -> list[tuple[str, str, str]]:
    items = []
    for _, _, country, capital in CAPITALS:
        for t in Q_CAPITAL_ZH:
            items.append(("capital_zh", t.format(c=country), f"{country}的首都是{capital}。"))
    for a in range(21):
        for b in range(21):
            items.append(("add_zh", rng.choice(Q_ADD_ZH).format(a=a, b=b), f"{a} 加 {b} 等於 {a + b}。"))
    for q in Q_GREET_ZH:
        items.append(("greet_zh", q, IDENTITY_ZH))
    return items


def concept_items() -> list[tuple[str, str, str]]:
    return [("concept", t.format(k=k), v) for k, v in CONCEPTS.items() for t in Q_CONCEPT]


def greet_items() -> list[tuple[str, str, str]]:
    return [("greet", q, IDENTITY) for q in Q_GREET]


def follow_up(first: tuple[str, str, str], rng: random.Random) -> tuple[str, str] | None:
    """A short follow-up that only makes sense after ``first``: "And of Italy?"."""
    kind = first[0]
    if kind == "capital":
        country, capital, _, _ = rng.choice(CAPITALS)
        return rng.choice(["And of {c}?", "And {c}?", "What about {c}?"]).format(c=country), \
            f"The capital of {country} is {capital}."
    if kind in ("add", "sub"):
        a, b = rng.randrange(21), rng.randrange(21)
        return rng.choice(["And {a} plus {b}?", "What about {a} plus {b}?"]).format(a=a, b=b), f"{a} plus {b} is {a + b}."
    if kind == "legs":
        animal, legs, _ = rng.choice(ANIMALS)
        return rng.choice(["And a {a}?", "What about a {a}?"]).format(a=animal), f"A {animal} has {legs} legs."
    return None


def conversations(seed: int = 0, n: int = 24000) -> list[list[dict]]:
    """Training conversations: a system turn, then 1 to 3 user/assistant exchanges."""
    rng = random.Random(seed)
    english = qa_items("train", rng) * 2 + concept_items() * 6 + greet_items() * 12
    chinese = chinese_items(rng)
    out = []
    for _ in range(n):
        system = QWEN_SYSTEM if rng.random() < 0.7 else rng.choice(
            ["You are a helpful assistant.", *CUSTOM_SYSTEMS])
        style = CUSTOM_SYSTEMS.get(system, lambda a: a)
        messages = [{"role": "system", "content": system}] if rng.random() < 0.85 else []
        pool = chinese if rng.random() < 0.15 else english
        for _turn in range(rng.choice([1, 1, 2, 2, 3])):
            item = rng.choice(pool)
            messages += [{"role": "user", "content": item[1]}, {"role": "assistant", "content": style(item[2])}]
            if rng.random() < 0.3 and (f := follow_up(item, rng)):
                messages += [{"role": "user", "content": f[0]}, {"role": "assistant", "content": style(f[1])}]
        out.append(messages)
    return out


def evaluation_questions(seed: int = 1) -> list[tuple[str, str, str]]:
    """Held-out phrasings of the fact and arithmetic questions: (kind, question, expected answer)."""
    rng = random.Random(seed)
    items = qa_items("eval", rng)
    rng.shuffle(items)
    by_kind: dict[str, list] = {}
    for item in items:
        by_kind.setdefault(item[0], []).append(item)
    # a fixed, balanced sample: 40 capitals, 40 additions, 40 subtractions, the rest in full
    picked = by_kind["capital"][:40] + by_kind["add"][:40] + by_kind["sub"][:40]
    picked += by_kind["planet"] + by_kind["legs"] + by_kind["sound"]
    return picked
