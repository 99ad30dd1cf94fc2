"""Writes the two invented chat exports beside this file: `whatsapp-chat.txt` (an Android "Export chat", 24-hour
clock; the app names it `WhatsApp Chat with Tomás.txt`) and `telegram-result.json` (a Telegram Desktop export of one personal chat). Maya and Tomás
are made up; so is everything they say. Deterministic: running it again writes the same bytes.

    python examples/make_chats.py
"""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

HERE = Path(__file__).parent

# Short exchanges between M(aya) and T(omás), in the order they happen; "\n" inside a message makes a message
# of several lines. Every second and third exchange goes to WhatsApp, every third to Telegram: the two use both.
EXCHANGES = [
    [("M", "morning!"), ("M", "did you sleep at all"), ("T", "about four hours"), ("T", "the neighbours had a party"), ("M", "oh no"), ("M", "coffee later?"), ("T", "yes please")],
    [("T", "are you still coming on saturday?"), ("M", "yes! what should I bring"), ("T", "nothing, just yourself"), ("M", "I'll bring the lemon cake then"), ("T", "I was hoping you'd say that")],
    [("M", "the bus is 20 min late again"), ("T", "classic"), ("M", "I'm going to walk"), ("T", "take the park way, it's nicer")],
    [("T", "look what I found in the attic"), ("T", "<Media omitted>"), ("M", "is that your old bike??"), ("T", "the very one"), ("M", "you have to fix it up")],
    [("M", "how was the interview"), ("T", "I think it went ok"), ("T", "they asked a lot about spreadsheets"), ("M", "you love spreadsheets"), ("T", "I do, secretly"), ("M", "not so secretly")],
    [("T", "dinner at mine tonight?"), ("M", "what are you making"), ("T", "the mushroom risotto"), ("M", "I'm in"), ("M", "8?"), ("T", "8 is good")],
    [("M", "thank you for tonight"), ("M", "that was really nice"), ("T", "it was! let's do it again soon"), ("M", "next time at mine")],
    [("M", "can you send me the recipe"), ("T", "which one"), ("M", "the risotto obviously"), ("T", "ok one sec"), ("T", "onion, garlic, rice, wine\nthen stock a ladle at a time\nmushrooms fried separately, in at the end"), ("M", "thank you chef")],
    [("T", "it's snowing here"), ("M", "no way, here it's just grey"), ("T", "I'll make you a tiny snowman"), ("M", "send pictures"), ("T", "<Media omitted>"), ("M", "he's perfect")],
    [("M", "are you watching the match"), ("T", "of course"), ("T", "what a goal"), ("M", "I screamed"), ("M", "the cat left the room")],
    [("T", "my plant is dying"), ("M", "which one"), ("T", "the big one by the window"), ("M", "too much water probably"), ("T", "I water it once a week!"), ("M", "that's too much for that one")],
    [("M", "I finished the book"), ("T", "and?"), ("M", "the ending made me so angry"), ("T", "told you"), ("M", "you did not tell me"), ("T", "I said it was sad"), ("M", "sad is not the same as angry")],
    [("T", "quick question"), ("T", "do you still have my blue umbrella"), ("M", "maybe"), ("M", "yes"), ("M", "I'll bring it on sunday")],
    [("M", "I'm at the market, want anything?"), ("T", "those good tomatoes if they have them"), ("M", "they do"), ("M", "how many"), ("T", "like 6")],
    [("T", "guess who I ran into"), ("M", "who"), ("T", "Mr Abbott from school"), ("M", "NO"), ("M", "is he still terrifying"), ("T", "he asked about you"), ("M", "I'm moving countries")],
    [("M", "my back hurts from that new chair"), ("T", "return it"), ("M", "it was on sale"), ("T", "then put a cushion on it"), ("M", "genius")],
    [("T", "running late, 10 min"), ("M", "no rush"), ("M", "I'm at the table by the window")],
    [("T", "have you seen the new series everyone talks about"), ("M", "two episodes"), ("T", "and?"), ("M", "slow but good"), ("T", "ok I'll try it")],
    [("T", "ok I'm on episode 5 of that series"), ("M", "and??"), ("T", "you were right, it gets so good"), ("M", "wait until 7"), ("T", "no spoilers!!")],
    [("M", "happy birthday!!!"), ("M", "🎉🎂"), ("T", "thank you!!"), ("T", "I feel very old"), ("M", "you are very old"), ("T", "rude")],
    [("T", "can I borrow your drill this weekend"), ("M", "sure"), ("M", "it's in the hall cupboard, top shelf"), ("T", "you're the best")],
    [("T", "the shelf is up"), ("T", "<Media omitted>"), ("M", "it's a bit crooked"), ("T", "it's artistic"), ("M", "sure it is")],
    [("M", "ugh work"), ("T", "bad day?"), ("M", "three meetings that could have been emails"), ("T", "want to get noodles after"), ("M", "yes. so much yes")],
    [("T", "I signed up for the 10k"), ("M", "wait really"), ("T", "in june"), ("M", "I'll come cheer"), ("T", "bring snacks"), ("M", "for me or for you"), ("T", "both")],
    [("M", "the heating is broken again"), ("T", "oh no, call the landlord"), ("M", "I did, he said tuesday"), ("T", "come stay here if it gets too cold"), ("M", "I might take you up on that")],
    [("M", "heating fixed!"), ("T", "finally"), ("M", "it only took him nine days"), ("T", "a record")],
    [("T", "what was the name of that café"), ("M", "the one with the green door?"), ("T", "yes"), ("M", "Little Fern"), ("T", "thanks")],
    [("T", "went to Little Fern"), ("T", "the cinnamon buns!!"), ("M", "I know right"), ("M", "did you get the big one"), ("T", "I got two")],
    [("M", "do you want to go to the coast on sunday"), ("T", "if the weather holds"), ("M", "it says sun"), ("T", "then yes"), ("M", "train at 9?"), ("T", "make it 10 and you have a deal")],
    [("T", "the beach was so good"), ("M", "I'm still sandy"), ("T", "same"), ("T", "<Media omitted>"), ("M", "that sunset!!")],
    [("M", "did you call your mum back"), ("T", "not yet"), ("M", "Tomás"), ("T", "I know I know"), ("T", "tonight, promise")],
    [("T", "called mum"), ("T", "she says hi and asks when you're visiting"), ("M", "tell her soon"), ("M", "and that I still have her scarf")],
    [("T", "I burnt the rice"), ("M", "how"), ("T", "I was reading"), ("M", "what were you reading"), ("T", "a cookbook"), ("M", "😂")],
    [("M", "new haircut, don't laugh"), ("M", "<Media omitted>"), ("T", "it looks great actually"), ("M", "really?"), ("T", "really")],
    [("T", "are you free for a call later"), ("M", "after 7"), ("T", "perfect")],
    [("M", "can you water my plants while I'm away"), ("T", "the dying one too?"), ("M", "that's YOUR plant"), ("T", "right, yes, of course"), ("M", "thursday to monday"), ("T", "no problem")],
    [("T", "plants are alive"), ("T", "all of them"), ("M", "you're a star"), ("T", "I talked to them a bit"), ("M", "that's what they like")],
    [("M", "just landed"), ("T", "welcome back!"), ("M", "I brought you cheese"), ("T", "best friend ever")],
    [("T", "the cat next door is in my kitchen again"), ("M", "give him a name"), ("T", "he already has one, it's on his collar"), ("M", "what is it"), ("T", "Pancake"), ("M", "perfect")],
    [("T", "Pancake is asleep on my laptop"), ("M", "so you can't work"), ("T", "I physically cannot"), ("M", "the rules are the rules")],
    [("T", "did you get the tickets"), ("M", "yes! row F"), ("T", "amazing"), ("M", "doors at 7:30")],
    [("M", "that concert was unreal"), ("T", "my ears are still ringing"), ("M", "worth it"), ("T", "completely")],
    [("T", "I think I'm getting a cold"), ("M", "honey and lemon"), ("M", "and sleep"), ("T", "yes doctor"), ("M", "I'll bring soup tomorrow")],
    [("M", "how's the cold"), ("T", "better, thanks to the soup"), ("M", "my grandmother's recipe"), ("T", "tell her thank you")],
    [("M", "training update?"), ("T", "ran 7k today"), ("M", "!!"), ("T", "slowly"), ("M", "7k is 7k")],
    [("T", "what do you want for your birthday"), ("M", "nothing"), ("T", "that's not an option"), ("M", "ok a plant"), ("T", "a plant I'm not allowed to water"), ("M", "exactly")],
    [("M", "I got the job offer"), ("T", "!!!"), ("T", "the one in the city?"), ("M", "yes"), ("T", "I'm so happy for you"), ("M", "I'm terrified"), ("T", "that's how you know it's right")],
    [("M", "I said yes"), ("T", "🎉🎉🎉"), ("T", "when do you start"), ("M", "first of july"), ("T", "we're celebrating this weekend"), ("T", "what's your new work email? I'll send the invite there too"), ("M", "maya.lind@example.com")],
    [("T", "moving boxes: I have twelve"), ("M", "you are a hero"), ("T", "also tape"), ("M", "a true hero")],
    [("M", "last box is in the van"), ("T", "I'm sore everywhere"), ("M", "pizza is on me"), ("T", "two pizzas")],
    [("M", "the new flat is so quiet"), ("T", "no party neighbours?"), ("M", "just a very old dog"), ("T", "the dream")],
    [("T", "race is on sunday"), ("M", "I made a sign"), ("T", "what does it say"), ("M", "you'll see"), ("T", "oh no")],
    [("M", "you did it!!!"), ("M", "58 minutes!"), ("T", "I can't feel my legs"), ("M", "the sign worked"), ("T", "the sign was embarrassing"), ("M", "the sign worked")],
    [("M", "first week at the new job done"), ("T", "and?"), ("M", "nice people, too many acronyms"), ("T", "you'll learn them"), ("M", "I made a spreadsheet"), ("T", "now THAT is my friend")],
    [("M", "running to the shop, back in 5"), ("T", "ok")],
    [("T", "good night"), ("M", "night! sleep this time"), ("T", "I'll try")],
]  # fmt: skip

PEOPLE = {"M": "Maya", "T": "Tomás"}
TELEGRAM_NAMES = {"M": "Maya Lind", "T": "Tomás Ruiz"}  # the same two people, spelt as Telegram shows them
MORNING, EVENING = {"morning!"}, {"good night", "thank you for tonight", "are you watching the match"}


def timeline(rng: random.Random, exchanges, start: datetime) -> list[tuple[datetime, str, str, int]]:
    """(time, who, text, exchange index) messages: each exchange a day or two after the one before (or later that day), at
    an hour that suits it; messages a few seconds apart within a burst, minutes apart between people."""
    out, t = [], start
    for k, ex in enumerate(exchanges):
        first = ex[0][1]
        hours = [8, 9] if first in MORNING else [21, 22] if first in EVENING else [8, 12, 13, 17, 18, 19, 20, 21]
        day = t.date() + timedelta(days=rng.choice((0, 1, 1, 2, 3)))
        t2 = datetime.combine(day, datetime.min.time()).replace(hour=rng.choice(hours), minute=rng.randint(0, 50))
        while t2 <= t:
            t2 += timedelta(days=1)
        t, prev = t2, None
        for who, text in ex:
            t += timedelta(seconds=rng.randint(5, 50) if who == prev else rng.randint(30, 240))
            out.append((t, who, text, k))
            prev = who
    return out


def whatsapp(msgs) -> str:
    msgs = [(t, who, text) for t, who, text, k in msgs if k % 3 != 2]
    lines = [
        f"{msgs[0][0] - timedelta(minutes=5):%d/%m/%Y, %H:%M} - Messages and calls are end-to-end encrypted. "
        "No one outside of this chat, not even WhatsApp, can read or listen to them. Tap to learn more."
    ]
    for i, (t, who, text) in enumerate(msgs):
        if i == 40:
            lines.append(f"{t:%d/%m/%Y, %H:%M} - {PEOPLE[who]}: This message was deleted")
        if i == 90:
            text += " <This message was edited>"
        lines.append(f"{t:%d/%m/%Y, %H:%M} - {PEOPLE[who]}: {text}")
    return "\n".join(lines) + "\n"


def unixtime(t: datetime) -> str:
    """Telegram's `date_unixtime` beside the local `date`: this export's clock is UTC (the same on every machine)."""
    return str(int(t.replace(tzinfo=timezone.utc).timestamp()))


def telegram(msgs) -> dict:
    msgs = [(t, who, text) for t, who, text, k in msgs if k % 3 == 2]
    out: list[dict] = []

    def add(t: datetime, **fields):
        out.append({"id": len(out) + 1, "type": fields.pop("type", "message"), "date": t.isoformat(), "date_unixtime": unixtime(t), **fields})  # fmt: skip

    for i, (t, who, text) in enumerate(msgs):
        sender = {"from": TELEGRAM_NAMES[who], "from_id": f"user{100 + ord(who)}"}
        if i == 10:
            add(t - timedelta(minutes=30), type="service", actor=TELEGRAM_NAMES["T"], actor_id=f"user{100 + ord('T')}",
                action="phone_call", duration_seconds=312, text="", text_entities=[])  # fmt: skip
        if text == "<Media omitted>":
            add(t, **sender, photo="(File not included. Change data exporting settings to download.)", width=1280,
                height=960, text="", text_entities=[])  # fmt: skip
        elif i == 30:
            link = "https://example.org/little-fern"
            parts = [{"type": "plain", "text": "menu is here: "}, {"type": "link", "text": link}]
            add(t, **sender, text=["menu is here: ", parts[1]], text_entities=parts)
        else:
            edited = {"edited": (t + timedelta(minutes=1)).isoformat()} if i == 55 else {}
            add(t, **sender, text=text, **edited, text_entities=[{"type": "plain", "text": text}])
    return {"name": TELEGRAM_NAMES["T"], "type": "personal_chat", "id": 4815162342, "messages": out}


def main() -> None:
    msgs = timeline(random.Random(1), EXCHANGES, datetime(2024, 3, 4, 8))  # one story, told in two apps
    (HERE / "whatsapp-chat.txt").write_text(whatsapp(msgs), encoding="utf-8")
    text = json.dumps(telegram(msgs), ensure_ascii=False, indent=1)
    (HERE / "telegram-result.json").write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
