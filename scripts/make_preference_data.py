"""Writes the shipped preference set `jaxllm/assets/preference/{train,val}.jsonl` (stdlib only).

Two kinds of record, for reward modelling and DPO:
  service  an English customer-service question and six answers, in the rankings format
           {"prompt", "responses": [r0, ..., r5], "ranking": [best, ..., worst], "task"}:
           polite and helpful > curt (the bare fact) > polite with another question's fact >
           evasive > word salad (the fact's words shuffled, with a polite opener half the
           time) > rude. Each class has several wordings and the answers are shuffled, so
           neither one string nor a position gives the rank away. Without the curt, wrong-fact
           and salad answers a reward model learns "contains words of a fact" (shuffled fact
           words scored 4.60 against 5.49 for the polite answer, evasive 0.07) and PPO's
           policy games it with word salad (docs/experiments.md, "the demo's final chat
           model").
  math     {"prompt": "What is 17 + 25?", "chosen": "42", "rejected": "43", "task"}, the
           prompt phrased as in make_sft_data.py; the wrong answer is off by a little or has
           its digits swapped.
Held out by item: a question (all its paraphrases) or a pair of numbers (in either order: 17 + 25
and 25 + 17 are one item) is entirely in train or entirely in val, by scripts/heldout.py's rule,
which every generator shares, so the val sums of all shipped sets are the same ones.

    python scripts/make_preference_data.py [--out jaxllm/assets/preference]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

from heldout import arith_key, in_val

ROOT = Path(__file__).resolve().parent.parent
SAMPLES_PER_PROMPT = 4  # service records per paraphrase, each with other wordings
MATH_LIMITS = (900, 90)  # (train, val) caps

# (paraphrases of one question, the helpful fact that answers it)
SERVICE = [
    (["Where is my order?", "Where is my package?", "My order has not arrived. Where is it?",
      "Can you tell me where my order is?"],
     "You can track it under My Orders; the tracking link shows where your parcel is now."),
    (["How do I reset my password?", "I forgot my password. What do I do?",
      "How can I change my password?", "I can't log in. How do I reset my password?"],
     "Click Forgot Password on the login page and follow the link we email you."),
    (["How do I get a refund?", "Can I get my money back?", "How do refunds work?",
      "I want a refund. What should I do?"],
     "Open the order, choose Request Refund, and the money is back on your card in 5 days."),
    (["How long does delivery take?", "When will my order arrive?",
      "How many days is shipping?", "How fast is delivery?"],
     "Standard delivery takes 3 to 5 working days; express takes 1 to 2."),
    (["What are your opening hours?", "When are you open?", "What time do you open?",
      "Are you open on weekends?"],
     "We are open 9 am to 6 pm, Monday to Saturday, and closed on Sunday."),
    (["How do I return an item?", "Can I send this back?", "How do returns work?",
      "I want to return something. How?"],
     "Print the free return label from My Orders and drop the parcel at any post office."),
    (["How do I cancel my order?", "Can I cancel my order?", "I want to cancel an order.",
      "How can I stop my order?"],
     "Open My Orders and press Cancel; it works until the order has shipped."),
    (["How do I change my address?", "Can I update my delivery address?",
      "I moved. How do I change my address?", "Where do I edit my address?"],
     "Go to Account, then Addresses, and edit or add your new address there."),
    (["Do you ship abroad?", "Can you deliver to another country?",
      "Do you offer international shipping?", "Can I order from overseas?"],
     "Yes, we ship to over 40 countries; the checkout shows the cost for yours."),
    (["How much is shipping?", "What does delivery cost?", "Is shipping free?",
      "How much do you charge for delivery?"],
     "Shipping is free over 30 dollars; below that it costs 4 dollars."),
    (["Which payment methods do you accept?", "Can I pay by card?", "How can I pay?",
      "Do you take PayPal?"],
     "We accept all major cards, PayPal and bank transfer."),
    (["My item arrived broken. What now?", "The product is damaged. What do I do?",
      "I got a broken item.", "What if my order is damaged?"],
     "Sorry about that! Send us a photo and we will ship a replacement for free."),
    (["How do I contact support?", "How can I reach a person?", "What is your phone number?",
      "Can I talk to someone?"],
     "Call us at 555 0100 or use the chat button; we answer within a few minutes."),
    (["How do I delete my account?", "Can I close my account?", "I want to remove my account.",
      "How do I cancel my account?"],
     "Go to Account, then Privacy, and press Delete Account; it takes effect at once."),
    (["Do you have this in another size?", "Is there a bigger size?", "Can I get a smaller size?",
      "Which sizes do you have?"],
     "Pick the size on the product page; grey sizes are out of stock for now."),
    (["When will this be back in stock?", "This item is sold out. When is it back?",
      "Will you restock this?", "Is this coming back?"],
     "Press Notify Me on the product page and we email you as soon as it is back."),
    (["Can I change my order?", "I ordered the wrong thing. Can I change it?",
      "How do I edit my order?", "Can I add an item to my order?"],
     "You can edit the order in My Orders for one hour after you placed it."),
    (["Do you have a discount code?", "Are there any coupons?", "Is there a sale?",
      "How can I get a discount?"],
     "Sign up for our newsletter and you get 10 percent off your first order."),
    (["How do I use a gift card?", "Can I pay with a gift card?", "Where do I enter my gift card?",
      "How do gift cards work?"],
     "Enter the gift card code at checkout, under Payment, and it is taken off the total."),
    (["Why was my card declined?", "My payment failed. Why?", "The payment did not work.",
      "Why can't I pay?"],
     "Check the card number and expiry date; if it still fails, your bank can tell you why."),
    (["Is my order paid?", "Did my payment go through?", "Was I charged?",
      "How do I know my payment worked?"],
     "If you got an order email, the payment went through; My Orders shows it as paid."),
    (["Can I pick up my order in store?", "Do you offer store pickup?",
      "Can I collect my order?", "Is click and collect possible?"],
     "Yes, choose Pick Up In Store at checkout; we text you when it is ready."),
    (["How do I track my parcel?", "Is there a tracking number?", "Where is my tracking number?",
      "How can I follow my delivery?"],
     "The tracking number is in your shipping email; enter it on the carrier's site."),
    (["Do you have a warranty?", "Is there a guarantee?", "How long is the warranty?",
      "What if it breaks after a month?"],
     "Every product has a two year warranty; we repair or replace it for free."),
    (["Can I get an invoice?", "Where is my receipt?", "I need a bill for my order.",
      "How do I download my invoice?"],
     "Open the order in My Orders and press Download Invoice."),
    (["How do I unsubscribe from emails?", "Stop sending me emails.",
      "How do I leave the newsletter?", "I get too many emails."],
     "Click Unsubscribe at the bottom of any email, or turn emails off under Account."),
    (["My parcel says delivered but I don't have it.", "It says delivered, but nothing came.",
      "The tracking says delivered. Where is it?", "I never got my delivered parcel."],
     "Check with neighbours first; if it is not there in a day, we send a new one."),
    (["Can I order by phone?", "Can I place an order over the phone?",
      "Do you take phone orders?", "Can someone order for me by phone?"],
     "Yes, call 555 0100 and our team will place the order for you."),
    (["Do you have a shop near me?", "Where are your stores?", "Is there a store in my city?",
      "Where can I find a shop?"],
     "Use the Store Finder at the top of our website to see the shops near you."),
    (["How do I change my email address?", "Can I use a new email?",
      "How do I update my email?", "Where do I edit my email address?"],
     "Go to Account, then Login Details, and enter your new email address."),
    (["Can I buy now and pay later?", "Do you offer payment plans?",
      "Can I pay in parts?", "Is there a pay later option?"],
     "Yes, choose Pay Later at checkout to split the price into three payments."),
    (["Is this product in stock?", "Do you have this item?", "Is this available?",
      "Can I still buy this?"],
     "If the Add to Cart button is green, it is in stock and ships today."),
    (["How do I wrap my order as a gift?", "Do you offer gift wrapping?",
      "Can you wrap it as a present?", "Can I send this as a gift?"],
     "Tick Gift Wrap at checkout; it costs 2 dollars and you can add a note."),
    (["Why is my order late?", "My order is late. Why?", "The delivery is delayed.",
      "It should have come yesterday."],
     "Sorry for the wait! Carriers are busy this week; your tracking link shows the new date."),
    (["Do you sell gift cards?", "Can I buy a gift card?", "Where do I get a gift card?",
      "Do you have vouchers?"],
     "Yes, gift cards from 10 to 200 dollars are on our Gift Cards page."),
    (["How do I log out?", "Where is the sign out button?", "How can I sign out?",
      "I want to log out of my account."],
     "Open the menu under your name at the top right and press Log Out."),
    (["Can I change my delivery date?", "Can you deliver on another day?",
      "I won't be home. Can you deliver later?", "How do I pick a delivery day?"],
     "Use the tracking link to choose a new day or a safe place for the parcel."),
    (["Do you price match?", "It is cheaper elsewhere. Can you match it?",
      "Will you match a lower price?", "Can I get the lower price I saw?"],
     "Yes, send us the link within 7 days and we refund the difference."),
    (["Is my data safe with you?", "Do you sell my data?", "How do you use my data?",
      "Is my information private?"],
     "Your data is encrypted and never sold; our Privacy page explains what we keep."),
    (["Can I reorder something?", "How do I buy the same thing again?",
      "Can I repeat an old order?", "How do I order it again?"],
     "Open the old order in My Orders and press Buy Again."),
]  # fmt: skip

POLITE = [
    "Happy to help! {fact}",
    "Thanks for asking. {fact}",
    "Of course! {fact} Anything else I can do?",
    "Good question. {fact}",
    "Sure, here is how. {fact}",
    "{fact} Hope that helps!",
]
EVASIVE = [
    "I'm not sure, maybe check later.",
    "Hard to say. Try again some other time.",
    "I don't really know about that.",
    "It depends, I guess. Maybe ask again later.",
    "Not sure. It might work, it might not.",
    "Could be. I can't say for certain right now.",
]
RUDE = [
    "Figure it out yourself.",
    "Not my problem.",
    "Stop asking me that.",
    "Read the website, it's not hard.",
    "Why would I know? Go away.",
    "Ugh, that is a silly question.",
]


def salad(fact: str, rng: random.Random) -> str:
    """The fact's words in another order (never the fact itself), a polite opener half the
    time: fluent-looking parts, no sentence."""
    words = fact.split()
    shuffled = words[:]
    while shuffled == words:
        rng.shuffle(shuffled)
    text = " ".join(shuffled)
    return rng.choice(POLITE).format(fact=text) if rng.random() < 0.5 else text


def service(rng: random.Random) -> list[tuple[str, dict]]:
    """SAMPLES_PER_PROMPT records per paraphrase, each a different (polite, evasive, rude) mix,
    plus the curt, the wrong-fact and the salad answer. `extra` draws what those add (their
    texts and places), so `rng` draws as it did for the three-answer set and the math records
    after it are unchanged."""
    out, extra = [], random.Random(1)
    combos = list(itertools.product(range(len(POLITE)), range(len(EVASIVE)), range(len(RUDE))))
    for questions, fact in SERVICE:
        for q in questions:
            for p, e, r in rng.sample(combos, SAMPLES_PER_PROMPT):
                three = [POLITE[p].format(fact=fact), EVASIVE[e], RUDE[r]]  # best first
                order = list(range(3))
                rng.shuffle(order)  # the three answers' places among themselves
                responses = [three[k] for k in order]
                other = extra.choice([f for _, f in SERVICE if f != fact])
                wrong = extra.choice(POLITE).format(fact=other)  # polite, another question's
                ranked = [three[0], fact, wrong, three[1], salad(fact, extra), three[2]]
                for text in (fact, wrong, ranked[4]):  # the new answers go to random places
                    responses.insert(extra.randrange(len(responses) + 1), text)
                ranking = [responses.index(t) for t in ranked]
                out.append(
                    (questions[0], {"prompt": q, "responses": responses, "ranking": ranking})
                )
    return out


def wrong_sum(a: int, b: int, rng: random.Random) -> int:
    """A plausible wrong answer: digits swapped (when that changes it) or off by 1, 2 or 10."""
    right = a + b
    s = str(right)
    if len(s) == 2 and s[0] != s[1] and s[1] != "0" and rng.random() < 0.3:
        return int(s[::-1])
    while True:
        wrong = right + rng.choice([-10, -2, -1, 1, 2, 10])
        if wrong >= 0:
            return wrong


def math(rng: random.Random) -> list[tuple[str, dict]]:
    out = []
    for a in range(1, 50):
        for b in range(1, 50):
            rec = {"prompt": f"What is {a} + {b}?", "chosen": str(a + b)}
            rec["rejected"] = str(wrong_sum(a, b, rng))
            out.append((arith_key(a, "+", b), rec))  # b + a goes where a + b goes
    return out


def split(task: str, items: list[tuple[str, dict]], rng: random.Random, limits=None):
    train = [dict(r, task=task) for k, r in items if not in_val(k)]
    val = [dict(r, task=task) for k, r in items if in_val(k)]
    rng.shuffle(train)
    rng.shuffle(val)
    n_train, n_val = limits or (len(train), len(val))
    return train[:n_train], val[:n_val]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "jaxllm" / "assets" / "preference"))
    args = parser.parse_args()
    rng = random.Random(0)
    train, val = [], []
    for task, items, limits in (
        ("service", service(rng), None),
        ("math", math(rng), MATH_LIMITS),
    ):
        t, v = split(task, items, rng, limits)
        train += t
        val += v
        print(f"{task:8s} train {len(t):5d}  val {len(v):4d}")
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
