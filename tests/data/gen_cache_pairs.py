#!/usr/bin/env python3
"""Generates the semantic cache's evaluation corpus: single-turn and multi-turn pairs
of questions that need the same answer or a different one, split into calibration,
validation and test files by *frame* (a frame is one question with its wordings and
variants), so that no wording of a test question is ever seen while fitting.

    python3 tests/data/gen_cache_pairs.py            # writes tests/data/cache_pairs_*.jsonl
    python3 tests/data/gen_cache_pairs.py --check    # verifies the files are up to date

Deterministic: a fixed seed, no dependency beyond the standard library.

Each line: {"a": Q, "b": Q, "same_answer": bool, "category": C, "domain": D}, where a
question Q is a text or a conversation ([{"role": ..., "content": ...}, ...]).

Single-turn categories: paraphrase, near_repeat (typos, casing, punctuation, filler,
word order) — same answer; negation (not/never/avoid/without and antonyms), entity_swap,
number_date_unit, scope (my/your, all/some, singular/plural, time frame) — different.
Every category draws on the same frames, wordings and noise, so that none can be told
from its surface: paraphrases carry negative words both sides, negations are often
antonyms with no negative word, swaps come with rewording, and so on.

Multi-turn categories: mt_history_reworded, mt_irrelevant_history, mt_extra_chatter
(same answer); mt_context_swap, mt_detail_swap, mt_intent_flip (different).
"""

import argparse
import hashlib
import json
import random
import re
import sys
from pathlib import Path

SEED = 20261203
HERE = Path(__file__).resolve().parent
SPLITS = ("calibration", "validation", "test")

# ---------------------------------------------------------------------------------
# Slot pools. A frame names its slots: {e} an entity of a pool, {n} a quantity of a
# unit kind, {t} a time frame.
# ---------------------------------------------------------------------------------

POOLS = {
    "city": ["Lisbon", "Osaka", "Denver", "Nairobi", "Krakow", "Toronto", "Seville",
             "Hanoi", "Bogota", "Oslo", "Perth", "Montreal", "Dublin", "Cairo", "Austin",
             "Porto", "Zurich", "Manila", "Lima", "Glasgow"],
    "country": ["Canada", "Japan", "Brazil", "Kenya", "Norway", "Mexico", "Vietnam",
                "Portugal", "Chile", "Egypt", "Ireland", "Poland", "Peru", "Morocco",
                "Iceland", "Thailand"],
    "airline": ["Lufthansa", "Delta", "Ryanair", "Emirates", "Qantas", "KLM",
                "Air Canada", "Iberia", "Finnair", "JetBlue", "Turkish Airlines",
                "Aer Lingus"],
    "drug": ["ibuprofen", "amoxicillin", "metformin", "lisinopril", "paracetamol",
             "sertraline", "omeprazole", "atorvastatin", "cetirizine", "prednisone",
             "warfarin", "levothyroxine"],
    "condition": ["asthma", "diabetes", "migraine", "eczema", "anemia", "gout",
                  "hypertension", "insomnia", "sinusitis", "tendinitis"],
    "lang": ["Python", "Rust", "Go", "Java", "TypeScript", "Kotlin", "Ruby", "C#",
             "Swift", "Elixir", "Scala", "PHP"],
    "tool": ["Docker", "Git", "Postgres", "Redis", "Kubernetes", "Terraform", "Nginx",
             "Jenkins", "Kafka", "Ansible", "MongoDB", "Grafana"],
    "product": ["blender", "laptop", "sofa", "treadmill", "camera", "mattress",
                "headphones", "kettle", "bicycle", "printer", "monitor", "vacuum"],
    "brand": ["Acme", "Norda", "Velto", "Quill", "Brightway", "Orbix", "Tessel",
              "Lumio", "Kestrel", "Marlow"],
    "plan": ["Basic", "Plus", "Premium", "Family", "Student", "Business", "Starter",
             "Pro"],
    "bank": ["Chase", "Barclays", "Monzo", "Santander", "HSBC", "Revolut", "ING",
             "Wells Fargo", "Citi", "N26"],
    "state": ["California", "Texas", "Ontario", "Bavaria", "Victoria", "Florida",
              "Quebec", "Scotland", "New York", "Catalonia"],
    "subject": ["calculus", "chemistry", "French", "statistics", "biology", "history",
                "economics", "physics", "Spanish", "geometry", "philosophy"],
    "school": ["Oakridge College", "Northfield University", "Lakeside Academy",
               "Riverton Institute", "Westbrook School", "Hillcrest University"],
    "app": ["Slack", "Zoom", "Outlook", "Dropbox", "Notion", "Trello", "Spotify",
            "WhatsApp", "Teams", "Figma"],
    "device": ["iPhone", "Pixel", "Galaxy tablet", "Kindle", "Chromebook", "MacBook",
               "Surface", "Apple Watch", "PlayStation", "smart TV"],
    "benefit": ["dental cover", "gym allowance", "pension match", "parental leave",
                "tuition support", "health insurance", "commuter pass", "stock options"],
    "doc": ["lease", "will", "NDA", "employment contract", "prenup", "power of attorney",
            "sales contract", "partnership agreement"],
    "fund": ["index fund", "bond fund", "money market fund", "REIT", "target-date fund",
             "ETF"],
    "car": ["Corolla", "Civic", "Model 3", "Golf", "Outback", "F-150", "Mazda3", "Leaf",
            "Prius", "Tucson"],
}

NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven",
                8: "eight", 10: "ten", 12: "twelve", 20: "twenty", 30: "thirty"}


def fmt_quantity(kind, value, style=0):
    """A quantity as text; `style` picks an equivalent wording of the same value."""
    words = NUMBER_WORDS.get(value) if isinstance(value, int) else None
    if kind == "usd":
        return [f"${value}", f"{value} dollars", f"${value}.00"][style % 3]
    if kind == "eur":
        return [f"€{value}", f"{value} euros", f"EUR {value}"][style % 3]
    if kind == "kg":
        return [f"{value} kg", f"{value} kilograms", f"{value}kg"][style % 3]
    if kind == "lb":
        return [f"{value} lb", f"{value} pounds", f"{value} lbs"][style % 3]
    if kind == "mg":
        return [f"{value} mg", f"{value} milligrams", f"{value}mg"][style % 3]
    if kind == "days":
        return [f"{value} days", f"{words or value} days", f"{value}-day"][style % 2]
    if kind == "weeks":
        return [f"{value} weeks", f"{words or value} weeks"][style % 2]
    if kind == "months":
        return [f"{value} months", f"{words or value} months"][style % 2]
    if kind == "years":
        return [f"{value} years", f"{words or value} years"][style % 2]
    if kind == "percent":
        return [f"{value}%", f"{value} percent"][style % 2]
    if kind == "count":
        return [f"{value}", f"{words or value}"][style % 2]
    if kind == "date":
        month, day = value
        return [f"{month} {day}", f"{day} {month}", f"{month} {day}th" if day not in (1, 2, 3, 21, 22, 23, 31) else f"{month} {day}"][style % 3]
    if kind == "time":
        return [f"{value}:00", f"{value} o'clock"][style % 2]
    if kind == "gb":
        return [f"{value} GB", f"{value} gigabytes", f"{value}GB"][style % 3]
    if kind == "version":
        return [f"version {value}", f"v{value}"][style % 2]
    raise ValueError(kind)


# Values by kind, and the unit a value can be confused with (same number, another unit).
VALUES = {
    "usd": [15, 20, 25, 40, 50, 75, 100, 120, 200, 250, 500],
    "eur": [10, 20, 30, 45, 60, 80, 150, 300],
    "kg": [5, 7, 8, 10, 12, 15, 20, 23, 30, 32],
    "lb": [10, 15, 20, 25, 40, 50],
    "mg": [5, 10, 20, 25, 50, 100, 200, 250, 400, 500],
    "days": [2, 3, 5, 7, 10, 14, 30, 60, 90],
    "weeks": [2, 3, 4, 6, 8, 12],
    "months": [2, 3, 6, 12, 18, 24],
    "years": [2, 3, 5, 7, 10, 15, 20, 30],
    "percent": [3, 5, 10, 15, 20, 25, 40, 50],
    "count": [2, 3, 4, 5, 6, 8, 10, 12, 20],
    "date": [(m, d) for m in ("March", "May", "June", "August", "October", "December") for d in (3, 9, 14, 21, 28)],
    "time": [7, 8, 9, 10, 11, 14, 15, 16, 17, 18],
    "gb": [8, 16, 32, 64, 128, 256, 512],
    "version": ["2.1", "3.0", "3.2", "4.5", "11", "12", "17", "18"],
}
OTHER_UNIT = {"usd": "eur", "eur": "usd", "kg": "lb", "lb": "kg", "days": "weeks",
              "weeks": "months", "months": "years", "years": "months", "mg": "mg",
              "percent": "percent", "count": "count", "gb": "gb", "date": "date",
              "time": "time", "version": "version"}

TIMEFRAMES = [("this month", "last month"), ("this year", "last year"), ("today", "tomorrow"),
              ("this week", "next week"), ("in 2025", "in 2024"), ("right now", "next year")]

# ---------------------------------------------------------------------------------
# Frames: the same question in several wordings (`say`), the variants that change the
# answer (`neg`: negation or antonym; `scope`: possessor, quantifier, plurality or
# time frame), and the slots it takes.
# ---------------------------------------------------------------------------------


def frame(domain, say, neg, scope, e=None, n=None, t=False):
    return {"domain": domain, "say": say, "neg": neg, "scope": scope, "e": e, "n": n,
            "t": t}


FRAMES = [
    # support
    frame("support", ["How do I reset my {e} password?", "What's the way to reset the password on my {e} account?",
                      "I forgot my {e} password, how can I reset it?", "Steps to reset a forgotten {e} password?"],
          ["How do I stop {e} from asking me to reset my password?", "Why can't I reset my {e} password?"],
          ["How do I reset my colleague's {e} password?", "How do I reset every user's {e} password?"], e="app"),
    frame("support", ["Why does {e} keep crashing on my {x}?", "{e} crashes all the time on my {x}, why?",
                      "What makes {e} crash repeatedly on a {x}?"],
          ["Why does {e} never crash on my {x}?", "Why did {e} stop crashing on my {x}?"],
          ["Why does {e} keep crashing on all our {x}s?", "Why does {e} keep crashing on your {x}?"], e="app", t=False),
    frame("support", ["Can I use {e} offline?", "Does {e} work without an internet connection?",
                      "Is it possible to use {e} with no internet?"],
          ["Can I use {e} only when I'm online?", "Why does {e} refuse to work online?"],
          ["Can all the features of {e} be used offline?", "Can my whole team use {e} offline?"], e="app"),
    frame("support", ["How do I turn on two-factor authentication in {e}?", "How can I enable 2FA for {e}?",
                      "Where do I switch on two-step verification in {e}?"],
          ["How do I turn off two-factor authentication in {e}?", "How can I disable 2FA for {e}?"],
          ["How do I turn on two-factor authentication for everyone in {e}?", "How do I turn on two-factor authentication in {e} for my kids?"], e="app"),
    frame("support", ["How much storage does the {e} {n} model have left after updates?", "After updates, how much free space is left on a {n} {e}?",
                      "On the {n} {e}, how much storage remains once it's updated?"],
          ["How much storage does the {e} {n} model lose after updates?", "How much storage is used up by updates on a {n} {e}?"],
          ["How much storage do {e} {n} models have left after updates on average?", "How much storage did the {e} {n} model have left after last year's updates?"], e="device", n="gb"),
    frame("support", ["Why is my {e} battery draining so fast?", "My {e}'s battery drains really quickly, why?",
                      "What causes fast battery drain on my {e}?"],
          ["Why is my {e} battery lasting so long?", "Why is my {e} battery charging so fast?"],
          ["Why are the batteries of all our {e}s draining so fast?", "Why was my {e} battery draining so fast last year?"], e="device"),
    # billing
    frame("billing", ["How do I cancel my {e} plan?", "What's the way to cancel a {e} subscription?",
                      "I want to cancel my {e} plan, how do I do that?", "Cancelling the {e} plan: how?"],
          ["How do I keep my {e} plan from being cancelled?", "How do I reactivate my cancelled {e} plan?"],
          ["How do I cancel my son's {e} plan?", "How do I cancel all the {e} plans on our account?"], e="plan"),
    frame("billing", ["Why was I charged {n} twice?", "I got billed {n} two times, why?",
                      "Why do I see two charges of {n} on my card?"],
          ["Why was I never charged {n}?", "Why was I refunded {n} twice?"],
          ["Why were my parents charged {n} twice?", "Why was I charged {n} twice last year?"], n="usd"),
    frame("billing", ["Can I get a refund on the {e} plan within {n}?", "Is a refund possible for the {e} plan within {n}?",
                      "Within {n}, am I able to get my money back for the {e} plan?"],
          ["Can I get a refund on the {e} plan after {n}?", "Why is no refund allowed on the {e} plan within {n}?"],
          ["Can my whole company get a refund on the {e} plan within {n}?", "Could I get a refund on the {e} plan within {n} last year?"], e="plan", n="days"),
    frame("billing", ["Does the {e} plan include taxes?", "Are taxes included in the price of the {e} plan?",
                      "Is the {e} plan price with tax included?"],
          ["Does the {e} plan exclude taxes?", "Which taxes are not included in the {e} plan?"],
          ["Do all the plans include taxes like {e} does?", "Did the {e} plan include taxes last year?"], e="plan"),
    frame("billing", ["What happens if I pay my {e} bill {n} late?", "If my {e} bill is paid {n} late, what happens?",
                      "Paying the {e} bill {n} after the due date: what are the consequences?"],
          ["What happens if I pay my {e} bill {n} early?", "What happens if I never pay my {e} bill?"],
          ["What happens if we pay all our {e} bills {n} late?", "What happened when I paid my {e} bill {n} late last year?"], e="plan", n="days"),
    frame("billing", ["How do I update the card on my {e} account?", "How can I change the credit card used for {e}?",
                      "Where do I replace my payment card for {e}?"],
          ["How do I remove the card from my {e} account?", "Why can't I update the card on my {e} account?"],
          ["How do I update the cards on all my team's {e} accounts?", "How do I update the card on my partner's {e} account?"], e="app"),
    # health
    frame("health", ["Can I take {e} with alcohol?", "Is it safe to drink alcohol while taking {e}?",
                     "Is mixing {e} and alcohol okay?", "Can I have a drink when I'm on {e}?"],
          ["Why should I avoid alcohol when taking {e}?", "Is it safe to take {e} without food?"],
          ["Can children take {e} with alcohol?", "Can my elderly father take {e} with alcohol?"], e="drug"),
    frame("health", ["What is the maximum daily dose of {e} for an adult?", "How much {e} can an adult take in one day at most?",
                     "For adults, what's the highest safe daily dose of {e}?"],
          ["What is the minimum daily dose of {e} for an adult?", "What is the maximum daily dose of {e} for a child?"],
          ["What is the maximum single dose of {e} for an adult?", "What is the maximum weekly dose of {e} for an adult?"], e="drug"),
    frame("health", ["Is {n} of {e} a safe dose?", "Would a {n} dose of {e} be safe?",
                     "Is taking {n} of {e} safe?"],
          ["Is {n} of {e} an unsafe dose?", "Is {n} of {e} too low to work?"],
          ["Is {n} of {e} a safe dose for my toddler?", "Is {n} of {e} a safe dose every hour?"], e="drug", n="mg"),
    frame("health", ["What foods should I eat if I have {e}?", "If I have {e}, which foods are good for me?",
                     "With {e}, what should I be eating?"],
          ["What foods should I avoid if I have {e}?", "Which foods make {e} worse?"],
          ["What foods should my kids eat if they have {e}?", "What foods should I eat if my partner has {e}?"], e="condition"),
    frame("health", ["Is exercise good for {e}?", "Does working out help with {e}?",
                     "Can physical activity improve {e}?"],
          ["Is exercise bad for {e}?", "Can exercise trigger {e}?"],
          ["Is exercise good for {e} in children?", "Is intense exercise good for {e} in older adults?"], e="condition"),
    frame("health", ["What are the early symptoms of {e}?", "What are the first signs of {e}?",
                     "How does {e} show up at the start?"],
          ["What are the late symptoms of {e}?", "What are the symptoms that rule out {e}?"],
          ["What are the early symptoms of {e} in dogs?", "What are the early symptoms of {e} in babies?"], e="condition"),
    # travel
    frame("travel", ["How much checked baggage can I bring on {e}?", "What's the checked bag allowance on {e}?",
                     "On {e}, how many kilos of checked luggage are allowed?", "What checked luggage limit does {e} have?"],
          ["How much checked baggage is not allowed on {e}?", "How much carry-on baggage can I bring on {e}?"],
          ["How much checked baggage can my whole family bring on {e}?", "How much checked baggage could I bring on {e} last year?"], e="airline"),
    frame("travel", ["Do I need a visa to visit {e}?", "Is a visa required to travel to {e}?",
                     "Will I need a visa for a trip to {e}?"],
          ["Do I need a visa to leave {e}?", "Why don't I need a visa to visit {e}?"],
          ["Do my children need a visa to visit {e}?", "Does my employer need a visa to visit {e}?"], e="country"),
    frame("travel", ["Can I bring a {n} suitcase on {e}?", "Is a {n} bag allowed on {e}?",
                     "Will {e} let me check a {n} suitcase?"],
          ["Why can't I bring a {n} suitcase on {e}?", "Can I bring a suitcase lighter than {n} on {e}?"],
          ["Can each of us bring a {n} suitcase on {e}?", "Could I bring a {n} suitcase on {e} last year?"], e="airline", n="kg"),
    frame("travel", ["What is the best time of year to visit {e}?", "When is the ideal season to travel to {e}?",
                     "Which month is best for a trip to {e}?"],
          ["What is the worst time of year to visit {e}?", "When should I avoid travelling to {e}?"],
          ["What is the best time of year to visit {e} with kids?", "What was the best time to visit {e} last year?"], e="city"),
    frame("travel", ["Is the tap water safe to drink in {e}?", "Can you drink tap water in {e}?",
                     "Is drinking the tap water in {e} okay?"],
          ["Is the tap water unsafe to drink in {e}?", "Why is the tap water not safe in {e}?"],
          ["Is the tap water safe for babies in {e}?", "Is the tap water safe to drink everywhere in {e}?"], e="city"),
    frame("travel", ["How early should I arrive at the airport for a flight at {n}?", "For a {n} flight, how early do I need to get to the airport?",
                     "When should I be at the airport if my flight leaves at {n}?"],
          ["How late can I arrive at the airport for a flight at {n}?", "How early should I leave the airport after landing at {n}?"],
          ["How early should a group arrive at the airport for a flight at {n}?", "How early should I have arrived at the airport for yesterday's flight at {n}?"], n="time"),
    # legal
    frame("legal", ["Can my landlord enter without notice in {e}?", "In {e}, is a landlord allowed to come in without giving notice?",
                    "Is it legal in {e} for a landlord to enter without notice?"],
          ["Can my landlord enter with notice in {e}?", "When must my landlord not enter in {e}?"],
          ["Can my tenant's landlord enter without notice in {e}?", "Could landlords enter without notice in {e} before 2020?"], e="state"),
    frame("legal", ["How long do I have to file a small claims case in {e}?", "What's the deadline for a small claims suit in {e}?",
                    "In {e}, when does the time limit for small claims run out?"],
          ["How long do I have to respond to a small claims case in {e}?", "Is there no deadline to file a small claims case in {e}?"],
          ["How long do businesses have to file a small claims case in {e}?", "How long did I have to file a small claims case in {e} last year?"], e="state"),
    frame("legal", ["Is a verbal agreement binding in {e}?", "In {e}, does an oral contract hold up legally?",
                    "Are spoken agreements legally enforceable in {e}?"],
          ["Is a verbal agreement never binding in {e}?", "Is a written agreement binding in {e}?"],
          ["Are all verbal agreements binding in {e}?", "Was a verbal agreement binding in {e} ten years ago?"], e="state"),
    frame("legal", ["Do I need a lawyer to sign a {e}?", "Is a lawyer required to sign a {e}?",
                    "Must a {e} be signed in front of a lawyer?"],
          ["Do I need a lawyer to cancel a {e}?", "Can I sign a {e} without a lawyer?"],
          ["Does my business partner need a lawyer to sign a {e}?", "Do both of us need a lawyer to sign a {e}?"], e="doc"),
    frame("legal", ["Can I break my {e} after {n}?", "Is it possible to end my {e} after {n}?",
                    "After {n}, am I allowed to get out of my {e}?"],
          ["Can I break my {e} before {n}?", "Can I extend my {e} after {n}?"],
          ["Can my roommate break my {e} after {n}?", "Can we all break our {e}s after {n}?"], e="doc", n="months"),
    frame("legal", ["What is the minimum wage in {e}?", "How much is the minimum wage in {e}?",
                    "What's the lowest legal hourly pay in {e}?"],
          ["What is the maximum wage in {e}?", "Who is exempt from the minimum wage in {e}?"],
          ["What is the minimum wage for teenagers in {e}?", "What was the minimum wage in {e} five years ago?"], e="state"),
    # coding
    frame("coding", ["How do I read a file line by line in {e}?", "What's the way to iterate over a file's lines in {e}?",
                     "In {e}, how can I read a text file one line at a time?", "Reading a file line by line with {e}?"],
          ["How do I write a file line by line in {e}?", "How do I read a file without splitting it into lines in {e}?"],
          ["How do I read all files in a folder line by line in {e}?", "How do I read a file line by line in {e} asynchronously?"], e="lang"),
    frame("coding", ["How do I remove duplicates from a list in {e}?", "What's the simplest way to dedupe a list in {e}?",
                     "In {e}, how can I drop duplicate items from a list?"],
          ["How do I find duplicates in a list in {e}?", "How do I keep only duplicates in a list in {e}?"],
          ["How do I remove duplicates from all nested lists in {e}?", "How do I remove duplicates from a list in {e} while keeping order?"], e="lang"),
    frame("coding", ["How do I start a {e} container automatically on boot?", "How can I make {e} start automatically at boot?",
                     "What's the way to have {e} launch when the machine starts?"],
          ["How do I stop {e} from starting automatically on boot?", "How do I start {e} manually after boot?"],
          ["How do I start all {e} containers automatically on boot?", "How do I start a {e} container automatically on someone else's server?"], e="tool"),
    frame("coding", ["Does {e} {n} support Apple silicon?", "Is {e} {n} compatible with M1 Macs?",
                     "Can I run {e} {n} on an Apple silicon Mac?"],
          ["Why does {e} {n} not support Apple silicon?", "Does {e} {n} drop support for Apple silicon?"],
          ["Do all {e} plugins support Apple silicon in {n}?", "Did {e} {n} support Apple silicon at release?"], e="tool", n="version"),
    frame("coding", ["How do I install {e} on Ubuntu?", "What's the way to set up {e} on Ubuntu?",
                     "Installing {e} on Ubuntu, how?"],
          ["How do I uninstall {e} on Ubuntu?", "How do I install {e} on Ubuntu without root?"],
          ["How do I install {e} on all our Ubuntu servers at once?", "How do I install {e} on my colleague's Ubuntu laptop?"], e="tool"),
    frame("coding", ["How do I sort a map by value in {e}?", "In {e}, what's the way to order a dictionary by its values?",
                     "Sorting a hash map by value in {e}?"],
          ["How do I sort a map by key in {e}?", "How do I sort a map by value in descending order in {e}?"],
          ["How do I sort all maps in a list by value in {e}?", "How do I sort a map by value in {e} without copying it?"], e="lang"),
    # retail
    frame("retail", ["Can I return a {e} after {n}?", "Is it possible to return a {e} {n} after buying it?",
                     "After {n}, will you still take back a {e}?"],
          ["Can I return a {e} before {n}?", "Why can't I exchange a {e} after {n}?"],
          ["Can I return two {e}s after {n}?", "Could I return a {e} after {n} last year?"], e="product", n="days"),
    frame("retail", ["Is the {x} {e} in stock?", "Do you have the {x} {e} available?",
                     "Is the {e} by {x} available right now?"],
          ["Is the {x} {e} out of stock?", "Is the {x} {e} discontinued?"],
          ["Are all {x} {e}s in stock?", "Was the {x} {e} in stock last week?"], e="product"),
    frame("retail", ["Does the {e} come with a warranty?", "Is a warranty included with the {e}?",
                     "Do you offer a warranty on the {e}?"],
          ["Does the {e} come without a warranty?", "What voids the warranty on the {e}?"],
          ["Do all refurbished {e}s come with a warranty?", "Did the {e} come with a warranty last year?"], e="product"),
    frame("retail", ["How much is shipping for a {n} parcel?", "What does it cost to ship a {n} package?",
                     "Shipping price for a parcel of {n}?"],
          ["How much is the refund of shipping for a {n} parcel?", "Why is shipping free for a {n} parcel?"],
          ["How much is shipping for several {n} parcels?", "How much was shipping for a {n} parcel last year?"], n="kg"),
    frame("retail", ["Can I pick up my {e} order in store?", "Is in-store pickup available for my {e} order?",
                     "Could I collect the {e} I ordered at the shop?"],
          ["Can I get my {e} order delivered instead of picking it up?", "Why can't I pick up my {e} order in store?"],
          ["Can my neighbour pick up my {e} order in store?", "Can I pick up all my {e} orders in store at once?"], e="product"),
    frame("retail", ["Is there a discount on the {e} with {n} off?", "Does the {e} have a {n} discount?",
                     "Is the {e} {n} off right now?"],
          ["Is there a surcharge on the {e} of {n}?", "Did the {e} lose its {n} discount?"],
          ["Are all {e}s {n} off?", "Was the {e} {n} off last month?"], e="product", n="percent"),
    # hr
    frame("hr", ["How many vacation days do I get in my first year?", "In the first year, how much paid time off do I have?",
                 "What's my holiday allowance during year one?"],
          ["How many vacation days do I lose in my first year?", "How many unpaid days off can I take in my first year?"],
          ["How many vacation days does my manager get in her first year?", "How many vacation days do I get in my fifth year?"]),
    frame("hr", ["Am I eligible for {e} after {n}?", "After {n}, do I qualify for {e}?",
                 "Can I get {e} once I've worked {n}?"],
          ["Am I eligible for {e} before {n}?", "Do I lose {e} after {n}?"],
          ["Are contractors eligible for {e} after {n}?", "Was I eligible for {e} after {n} under the old policy?"], e="benefit", n="months"),
    frame("hr", ["How do I request {e}?", "What's the process to apply for {e}?",
                 "Where do I sign up for {e}?"],
          ["How do I opt out of {e}?", "How do I cancel my request for {e}?"],
          ["How do I request {e} for my whole team?", "How does my spouse request {e}?"], e="benefit"),
    frame("hr", ["Can I work remotely from {e}?", "Is remote work allowed from {e}?",
                 "Am I allowed to work from {e} for a while?"],
          ["Can I be required to work on site in {e}?", "Why can't I work remotely from {e}?"],
          ["Can my whole team work remotely from {e}?", "Could I work remotely from {e} last year?"], e="country"),
    frame("hr", ["How much notice do I need to give before resigning after {n}?", "After {n} of employment, what notice period do I have to give?",
                 "If I quit after {n}, how much notice must I give?"],
          ["How much notice must my employer give before firing me after {n}?", "Do I need to give no notice at all after {n}?"],
          ["How much notice do managers need to give before resigning after {n}?", "How much notice did I need to give after {n} under my old contract?"], n="years"),
    frame("hr", ["Is overtime paid at {n} extra?", "Do we get {n} more for overtime hours?",
                 "Is the overtime premium {n}?"],
          ["Is overtime unpaid even at {n} extra?", "Is weekend work paid at {n} less?"],
          ["Is overtime paid at {n} extra for interns?", "Was overtime paid at {n} extra last year?"], n="percent"),
    # finance
    frame("finance", ["What is the interest rate on a {e} savings account?", "How much interest does a {e} savings account pay?",
                      "What rate do savings accounts at {e} earn?"],
          ["What is the interest rate on a {e} overdraft?", "What fees reduce the interest on a {e} savings account?"],
          ["What is the interest rate on a {e} savings account for kids?", "What was the interest rate on a {e} savings account last year?"], e="bank"),
    frame("finance", ["Is a {e} a good investment for beginners?", "Should a beginner invest in a {e}?",
                      "For someone just starting out, is a {e} a sensible investment?"],
          ["Is a {e} a bad investment for beginners?", "Why should beginners avoid a {e}?"],
          ["Is a {e} a good investment for retirees?", "Was a {e} a good investment for beginners in 2008?"], e="fund"),
    frame("finance", ["How much will {n} grow in {x}?", "If I invest {n}, what will it be worth in {x}?",
                      "What does {n} turn into after {x} of investing?"],
          ["How much will {n} lose in {x}?", "How much will {n} cost me in fees over {x}?"],
          ["How much will {n} a month grow in {x}?", "How much would {n} have grown in the past {x}?"], n="usd"),
    frame("finance", ["Can I transfer money from {e} to an account abroad?", "Is an international transfer possible from {e}?",
                      "Does {e} let me send money to a foreign account?"],
          ["Can I receive money from abroad into {e}?", "Why can't I transfer money from {e} abroad?"],
          ["Can my business transfer money from {e} to an account abroad?", "Could I transfer money from {e} abroad last year?"], e="bank"),
    frame("finance", ["Should I pay off debt before investing?", "Is it better to clear my debt first and then invest?",
                      "Do I pay down debt before I start investing?"],
          ["Should I invest before paying off debt?", "Should I never invest while I have debt?"],
          ["Should my parents pay off debt before investing?", "Should all households pay off debt before investing?"]),
    frame("finance", ["What is the penalty for withdrawing {n} early from a CD at {e}?", "At {e}, what does it cost to take {n} out of a CD early?",
                      "Early withdrawal of {n} from a {e} CD: what's the penalty?"],
          ["What is the bonus for leaving {n} in a CD at {e}?", "Is there no penalty for withdrawing {n} early from a CD at {e}?"],
          ["What is the penalty for withdrawing {n} early from a joint CD at {e}?", "What was the penalty for withdrawing {n} early from a CD at {e} in 2020?"], e="bank", n="usd"),
    # education
    frame("education", ["What is a good way to study for a {e} exam?", "How should I prepare for a {e} test?",
                        "Best way to revise for a {e} exam?"],
          ["What is a bad way to study for a {e} exam?", "What should I not do when studying for a {e} exam?"],
          ["What is a good way for my daughter to study for a {e} exam?", "What is a good way to teach a {e} class?"], e="subject"),
    frame("education", ["When is the application deadline at {e}?", "What's the deadline to apply to {e}?",
                        "By when do I have to submit my application to {e}?"],
          ["When is the withdrawal deadline at {e}?", "When do decisions come out at {e}?"],
          ["When is the application deadline for transfer students at {e}?", "When was the application deadline at {e} last year?"], e="school"),
    frame("education", ["Does {e} accept credits from community college?", "Will {e} take my community college credits?",
                        "Can I transfer community college credits to {e}?"],
          ["Does {e} reject credits from community college?", "Which community college credits does {e} not accept?"],
          ["Does {e} accept all credits from community college?", "Did {e} accept credits from community college in the past?"], e="school"),
    frame("education", ["How many hours a week should I study {e}?", "How much time per week do I need for {e}?",
                        "What's a good weekly study time for {e}?"],
          ["How many hours a week is too much for {e}?", "How many hours a day should I study {e}?"],
          ["How many hours a week should a class study {e} together?", "How many hours a week should I teach {e}?"], e="subject"),
    frame("education", ["Is there a scholarship at {e} for students with a {n} GPA?", "Can I get a scholarship at {e} with a GPA of {n}?",
                        "With a {n} GPA, is a scholarship possible at {e}?"],
          ["Is there a scholarship at {e} for students below a {n} GPA?", "Can I lose my scholarship at {e} with a {n} GPA?"],
          ["Is there a scholarship at {e} for international students with a {n} GPA?", "Was there a scholarship at {e} for a {n} GPA in 2019?"], e="school", n="gpa"),
    frame("education", ["Can I retake the {e} final if I fail?", "If I fail the {e} final, may I take it again?",
                        "Is a retake of the {e} final exam allowed after failing?"],
          ["Can I retake the {e} final if I pass?", "Why can't I retake the {e} final if I fail?"],
          ["Can everyone retake the {e} final if the class fails?", "Could I retake the {e} final if I failed last year?"], e="subject"),
    # auto
    frame("auto", ["How often should I change the oil in a {e}?", "What's the oil change interval for a {e}?",
                   "How many miles between oil changes on a {e}?"],
          ["How often should I not change the oil in a {e}?", "How often should I rotate the tires on a {e}?"],
          ["How often should a fleet of {e}s have the oil changed?", "How often should I have changed the oil in an older {e}?"], e="car"),
    frame("auto", ["What tire pressure should a {e} run at?", "What's the recommended tyre pressure for a {e}?",
                   "How much air should the tires of a {e} have?"],
          ["What tire pressure is too low for a {e}?", "What tire pressure should a {e} not exceed?"],
          ["What tire pressure should a loaded {e} towing a trailer run at?", "What tire pressure should the spare of a {e} run at?"], e="car"),
    frame("auto", ["Is a {e} good in snow?", "How does a {e} handle snowy roads?",
                   "Can a {e} drive well in the snow?"],
          ["Is a {e} bad in snow?", "Is a {e} good in heat?"],
          ["Are older {e}s good in snow?", "Is a {e} good in snow with summer tires?"], e="car"),
    frame("auto", ["How much does it cost to charge a {e} at home for {n}?", "What does home charging a {e} cost over {n}?",
                   "Charging a {e} at home for {n}: how much?"],
          ["How much do I save by not charging a {e} at home for {n}?", "How much does it cost to charge a {e} at a public station for {n}?"],
          ["How much does it cost to charge two {e}s at home for {n}?", "How much did it cost to charge a {e} at home for {n} in 2022?"], e="car", n="months"),
]

# extra words some frames use (a second entity, named {x})
X_POOL = {"app": POOLS["device"], "product": POOLS["brand"], "finance": None}

# ---------------------------------------------------------------------------------
# Conversation frames: a context turn (in several wordings), the follow-up asked, the
# context that changes the answer (swap), a detail to change, and the intent flip.
# ---------------------------------------------------------------------------------


def conv(domain, context, follow, swap_pool, flip, detail=None):
    return {"domain": domain, "context": context, "follow": follow, "pool": swap_pool,
            "flip": flip, "detail": detail}


CONVS = [
    conv("retail", ["I bought a {e} from you last week.", "Last week I ordered a {e} from your store.",
                    "I purchased one of your {e}s a few days ago."],
         ["How do I return it?", "What's the return process for it?", "Can I send it back?"], "product",
         ["I want to keep the {e} I bought last week, not send it back."]),
    conv("retail", ["My {e} arrived damaged.", "The {e} I got was broken when it arrived.",
                    "My {e} came with damage from shipping."],
         ["Can I get a replacement?", "Will you replace it?", "How do I get a new one?"], "product",
         ["My {e} arrived in perfect condition."]),
    conv("retail", ["I'd like to order a {e} to {d}.", "Please ship a {e} to {d}.", "I want a {e} delivered to {d}."],
         ["How long will delivery take?", "When would it arrive?", "What's the delivery time?"], "product",
         ["I'd like to cancel a {e} order to {d}."], detail="city"),
    conv("travel", ["I'm flying {e} next month.", "I have a {e} flight booked for next month.",
                    "Next month I'm travelling with {e}."],
         ["Can I bring my dog?", "Are pets allowed on board?", "Can my dog come in the cabin?"], "airline",
         ["I cancelled my {e} flight for next month."]),
    conv("travel", ["I'm planning a trip to {e} in {d}.", "We're going to {e} in {d}.",
                    "My holiday to {e} is in {d}."],
         ["What should I pack?", "What clothes should I bring?", "What do I need to pack for it?"], "city",
         ["I just got back from a trip to {e} in {d}."], detail="month"),
    conv("travel", ["My {e} flight was cancelled.", "{e} cancelled my flight.", "The flight I had with {e} got cancelled."],
         ["Am I entitled to compensation?", "Can I get compensated?", "Do they owe me compensation?"], "airline",
         ["I cancelled my {e} flight myself."]),
    conv("health", ["I've been prescribed {e}.", "My doctor put me on {e}.", "I just started taking {e}."],
         ["What side effects should I watch for?", "What are the side effects?", "Which side effects are common?"], "drug",
         ["My doctor took me off {e}."]),
    conv("health", ["I take {e} every morning.", "Every morning I have my {e}.", "My daily routine includes {e} in the morning."],
         ["Can I drink coffee with it?", "Is coffee okay with it?", "Does coffee interact with it?"], "drug",
         ["I stopped taking {e} in the mornings."]),
    conv("health", ["I was diagnosed with {e}.", "The doctor told me I have {e}.", "I found out I have {e}."],
         ["Can I still play sports?", "Is it okay to keep doing sports?", "Should I keep exercising?"], "condition",
         ["I was told I don't have {e} after all."]),
    conv("billing", ["I'm on the {e} plan.", "My subscription is the {e} plan.", "I currently pay for the {e} plan."],
         ["How much does it cost per month?", "What's the monthly price?", "What do I pay each month for it?"], "plan",
         ["I'm leaving the {e} plan."]),
    conv("billing", ["I want to upgrade to the {e} plan.", "I'd like to move up to the {e} plan.", "Please switch me to the {e} plan."],
         ["Will I be charged today?", "When does the charge happen?", "Do I pay the difference now?"], "plan",
         ["I want to downgrade from the {e} plan."]),
    conv("billing", ["I was charged {d} by mistake.", "There's a wrong charge of {d} on my account.", "You billed me {d} in error."],
         ["How long does a refund take?", "When will I get my money back?", "How fast is the refund?"], "plan",
         ["I was charged {d} correctly and want to pay it."], detail="usd"),
    conv("coding", ["I'm writing a web server in {e}.", "I'm building an HTTP server with {e}.", "My project is a {e} web server."],
         ["How do I handle JSON requests?", "What's the way to parse JSON bodies?", "How can I accept JSON in it?"], "lang",
         ["I'm removing the web server from my {e} project."]),
    conv("coding", ["I'm using {e} in production.", "We run {e} in prod.", "Our production stack includes {e}."],
         ["How do I back it up?", "What's the best backup approach for it?", "How should we take backups?"], "tool",
         ["We are migrating away from {e} in production."]),
    conv("coding", ["I need to upgrade {e} to {d}.", "We're moving {e} up to {d}.", "I'm planning the {e} upgrade to {d}."],
         ["What breaks in the upgrade?", "Which breaking changes should I expect?", "What will the upgrade break?"], "tool",
         ["I need to roll {e} back from {d}."], detail="version"),
    conv("legal", ["I rent an apartment in {e}.", "I'm a tenant in {e}.", "My apartment in {e} is rented."],
         ["Can my landlord raise the rent mid-lease?", "Is a rent increase during the lease allowed?", "Can the rent go up before the lease ends?"], "state",
         ["I own my apartment in {e}."]),
    conv("legal", ["I signed a {e} last month.", "Last month I put my name on a {e}.", "I entered into a {e} a month ago."],
         ["Can I cancel it?", "Is there a way to back out of it?", "Can I get out of it?"], "doc",
         ["I want to renew a {e} I signed last month."]),
    conv("hr", ["I'm going on {e} soon.", "I'm about to start {e}.", "My {e} begins next month."],
         ["Do I keep my health insurance?", "Will my health cover continue?", "Is my health insurance kept during it?"], "benefit",
         ["I'm coming back from {e} soon."]),
    conv("hr", ["I've worked here for {d}.", "I've been with the company {d}.", "My tenure here is {d}."],
         ["How many vacation days do I get?", "What's my holiday allowance?", "How much paid leave do I have?"], "benefit",
         ["I'm leaving after {d} here."], detail="years"),
    conv("finance", ["I have an account at {e}.", "I bank with {e}.", "My checking account is with {e}."],
         ["How do I order a new debit card?", "How can I get a replacement debit card?", "Where do I request a new card?"], "bank",
         ["I closed my account at {e}."]),
    conv("finance", ["I want to put {d} into an {e}.", "I'm planning to invest {d} in an {e}.", "I'm going to invest {d} in an {e}."],
         ["What are the risks?", "How risky is it?", "What could go wrong?"], "fund",
         ["I want to take {d} out of my {e}."], detail="usd"),
    conv("education", ["I'm taking {e} this semester.", "This term I'm enrolled in {e}.", "I signed up for {e} this semester."],
         ["How should I prepare for the midterm?", "What's the best way to get ready for the midterm?", "How do I study for the midterm?"], "subject",
         ["I dropped {e} this semester."]),
    conv("education", ["I applied to {e}.", "My application went to {e}.", "I sent an application to {e}."],
         ["When will I hear back?", "When do they send decisions?", "How long until I get an answer?"], "school",
         ["I withdrew my application to {e}."]),
    conv("support", ["I use {e} on my {x}.", "I have {e} installed on my {x}.", "My {x} runs {e}."],
         ["How do I clear the cache?", "Where do I clear its cache?", "How can I empty the cache?"], "app",
         ["I uninstalled {e} from my {x}."]),
    conv("support", ["My {e} won't turn on.", "My {e} doesn't power on anymore.", "I can't get my {e} to switch on."],
         ["What should I try first?", "What's the first thing to check?", "How do I troubleshoot it?"], "device",
         ["My {e} won't turn off."]),
    conv("auto", ["I drive a {e}.", "My car is a {e}.", "I own a {e}."],
         ["What oil should I use?", "Which engine oil does it take?", "What kind of oil is right for it?"], "car",
         ["I just sold my {e}."]),
    conv("auto", ["I'm buying a used {e} with {d} on it.", "I'm looking at a second-hand {e} that has {d}.", "There's a used {e} with {d} I want to buy."],
         ["What should I inspect?", "What should I check before buying?", "What do I look at during the inspection?"], "car",
         ["I'm selling my {e} with {d} on it."], detail="miles"),
]

DETAILS = {
    "city": POOLS["city"],
    "month": ["January", "April", "July", "October", "December", "March"],
    "usd": ["$40", "$120", "$15", "$300", "$75", "$9.99"],
    "version": ["version 3", "version 5", "v2.0", "version 12", "v7"],
    "years": ["two years", "six months", "ten years", "three weeks", "five years"],
    "miles": ["20,000 miles", "150,000 miles", "80,000 miles", "5,000 miles"],
}

IRRELEVANT = [
    [("user", "What's the capital of Peru?"), ("assistant", "Lima.")],
    [("user", "Can you recommend a good sci-fi novel?"), ("assistant", "Try 'The Left Hand of Darkness'.")],
    [("user", "How do I boil an egg?"), ("assistant", "Simmer it for about 9 minutes.")],
    [("user", "What's 15% of 80?"), ("assistant", "12.")],
    [("user", "Translate 'good morning' into Spanish."), ("assistant", "Buenos días.")],
    [("user", "Who painted the Mona Lisa?"), ("assistant", "Leonardo da Vinci.")],
    [("user", "Give me a synonym for happy."), ("assistant", "Cheerful.")],
]
CHATTER_BEFORE = ["ok thanks", "great, thank you!", "cool", "got it", "perfect, thanks a lot",
                  "alright", "sounds good"]
CHATTER_PREFIX = ["ok and ", "thanks! also, ", "great. ", "one more thing: ", "alright, ",
                  "hmm, "]
ASSISTANT_ACK = ["Thanks for letting me know.", "Understood.", "Got it, how can I help?",
                 "Okay.", "Sure, what would you like to know?"]

# ---------------------------------------------------------------------------------
# Noise for near repeats (and, lightly, for every category, so that noise is no tell).
# ---------------------------------------------------------------------------------

FILLER_PRE = ["hey, ", "hi, ", "quick question: ", "hello! ", "so, ", "um, ", "excuse me, "]
FILLER_POST = [" please", " thanks", " thanks!", " thank you", " pls", " asap"]


def typo(rng, s):
    words = s.split(" ")
    idx = [i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha() and not w[0].isupper()]
    if not idx:
        return s
    i = rng.choice(idx)
    w = words[i]
    j = rng.randrange(1, len(w) - 2)
    kind = rng.randrange(3)
    if kind == 0:
        w = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    elif kind == 1:
        w = w[:j] + w[j + 1:]
    else:
        w = w[:j] + w[j] + w[j:]
    words[i] = w
    return " ".join(words)


def reorder(s):
    """Moves a trailing 'in/for/on/at/to/from X' phrase to the front, if there is one."""
    m = re.match(r"^(.*\S) (in|for|on|at|with|from|to) ([^?]{2,30})\?$", s)
    if not m or len(m.group(1).split()) < 3:
        return None
    head, prep, tail = m.group(1), m.group(2), m.group(3)
    head = head[0].lower() + head[1:] if not head.startswith("I ") else head
    return f"{prep.capitalize()} {tail}, {head}?"


def noise(rng, s, strong):
    """A near repeat of `s`: one to three of casing, punctuation, filler, typo, order."""
    ops = ["case", "punct", "filler", "typo", "order"]
    rng.shuffle(ops)
    out = s
    for op in ops[: rng.randint(1, 3) if strong else 1]:
        if op == "case":
            out = rng.choice([out.lower(), out.upper(), out.capitalize()])
        elif op == "punct":
            out = rng.choice([out.rstrip("?") , out.rstrip("?") + "??", out.replace(",", ""), out + "!"])
        elif op == "filler":
            if rng.random() < 0.5:
                out = rng.choice(FILLER_PRE) + out[0].lower() + out[1:]
            else:
                out = out.rstrip("?") + rng.choice(FILLER_POST) + "?"
        elif op == "typo":
            out = typo(rng, out)
        elif op == "order":
            r = reorder(out)
            if r:
                out = r
    return out


# ---------------------------------------------------------------------------------
# Filling frames.
# ---------------------------------------------------------------------------------


def pick_value(rng, kind):
    if kind == "gpa":
        return rng.choice(["3.0", "3.5", "3.8", "2.5", "3.2", "4.0"])
    return rng.choice(VALUES[kind])


def quantity(kind, value, style):
    if kind == "gpa":
        return value
    return fmt_quantity(kind, value, style)


def x_for(f, rng):
    if "{x}" not in " ".join(f["say"] + f["neg"] + f["scope"]):
        return None
    if f["e"] == "app":
        return rng.choice(POOLS["device"])
    if f["e"] == "product":
        return rng.choice(POOLS["brand"])
    return rng.choice(["5 years", "10 years", "20 years", "30 years", "a decade"])


def fill(template, e, n_text, x):
    s = template
    if e is not None:
        s = s.replace("{e}", e)
    if n_text is not None:
        s = s.replace("{n}", n_text)
    if x is not None:
        s = s.replace("{x}", x)
    return s[0].upper() + s[1:] if s and s[0].islower() and not s.startswith(("iPhone",)) else s


def single_pairs(f, rng, per_frame):
    """The single-turn pairs of one frame."""
    out = []

    def slots():
        e = rng.choice(POOLS[f["e"]]) if f["e"] else None
        nv = pick_value(rng, f["n"]) if f["n"] else None
        return e, nv, x_for(f, rng)

    def text(t, e, nv, x, style=0):
        return fill(t, e, quantity(f["n"], nv, style) if f["n"] else None, x)

    def add(a, b, same, cat):
        if a == b:
            return
        if rng.random() < 0.5:
            a, b = b, a
        out.append({"a": a, "b": b, "same_answer": same, "category": cat, "domain": f["domain"]})

    counts = {"paraphrase": per_frame[0], "near_repeat": per_frame[1], "negation": per_frame[2],
              "entity_swap": per_frame[3], "number_date_unit": per_frame[4], "scope": per_frame[5]}
    say = f["say"]
    for _ in range(counts["paraphrase"]):
        e, nv, x = slots()
        i, j = rng.sample(range(len(say)), 2)
        a = text(say[i], e, nv, x, rng.randrange(3))
        b = text(say[j], e, nv, x, rng.randrange(3))  # the same quantity, maybe worded otherwise
        if rng.random() < 0.3:
            b = noise(rng, b, False)
        add(a, b, True, "paraphrase")
    for _ in range(counts["near_repeat"]):
        e, nv, x = slots()
        t = rng.choice(say)
        style = rng.randrange(3)
        add(text(t, e, nv, x, style), noise(rng, text(t, e, nv, x, style), True), True, "near_repeat")
    for _ in range(counts["negation"]):
        e, nv, x = slots()
        a = text(rng.choice(say), e, nv, x, rng.randrange(3))
        b = text(rng.choice(f["neg"]), e, nv, x, rng.randrange(3))
        if rng.random() < 0.25:
            b = noise(rng, b, False)
        add(a, b, False, "negation")
    if f["e"]:
        for _ in range(counts["entity_swap"]):
            e, nv, x = slots()
            e2 = rng.choice([p for p in POOLS[f["e"]] if p != e])
            style = rng.randrange(3)
            ta = rng.choice(say)
            tb = ta if rng.random() < 0.6 else rng.choice(say)
            b = text(tb, e2, nv, x, style)
            if rng.random() < 0.25:
                b = noise(rng, b, False)
            add(text(ta, e, nv, x, style), b, False, "entity_swap")
    if f["n"]:
        for _ in range(counts["number_date_unit"]):
            e, nv, x = slots()
            ta = rng.choice(say)
            tb = ta if rng.random() < 0.6 else rng.choice(say)
            style = rng.randrange(3)
            kind = f["n"]
            if kind != "gpa" and rng.random() < 0.3 and OTHER_UNIT[kind] != kind:
                b = fill(tb, e, fmt_quantity(OTHER_UNIT[kind], nv if not isinstance(nv, tuple) else nv, style), x) \
                    if not isinstance(nv, (tuple, str)) else None
                if b is None:
                    continue
            else:
                nv2 = pick_value(rng, kind)
                while nv2 == nv:
                    nv2 = pick_value(rng, kind)
                b = text(tb, e, nv2, x, style)
            add(text(ta, e, nv, x, style), b, False, "number_date_unit")
    elif f["e"] is None or True:
        # frames without a quantity: a time frame or a count stands in
        pass
    for _ in range(counts["scope"]):
        e, nv, x = slots()
        a = text(rng.choice(say), e, nv, x, rng.randrange(3))
        b = text(rng.choice(f["scope"]), e, nv, x, rng.randrange(3))
        if rng.random() < 0.25:
            b = noise(rng, b, False)
        add(a, b, False, "scope")
    return out


def conv_pairs(c, rng, per_kind):
    out = []
    dom = c["domain"]

    def ctx(t, e, d, x):
        s = t.replace("{e}", e).replace("{d}", d or "").replace("{x}", x or "")
        return s[0].upper() + s[1:]

    def slots():
        e = rng.choice(POOLS[c["pool"]])
        d = rng.choice(DETAILS[c["detail"]]) if c["detail"] else None
        x = rng.choice(POOLS["device"]) if "{x}" in " ".join(c["context"]) else None
        return e, d, x

    def convo(turns):
        return [{"role": r, "content": t} for r, t in turns]

    def base(context_text, follow_text, ack=None):
        return [("user", context_text), ("assistant", ack or rng.choice(ASSISTANT_ACK)), ("user", follow_text)]

    def add(a, b, same, cat):
        if rng.random() < 0.5:
            a, b = b, a
        users = lambda c: [t for r, t in c if r == "user"]
        if not same and users(a) == users(b):
            # a swap that changed nothing the user said (a context without the swapped
            # slot) is no different-answer pair
            return
        out.append({"a": convo(a), "b": convo(b), "same_answer": same, "category": cat, "domain": dom})

    for _ in range(per_kind):
        e, d, x = slots()
        i, j = rng.sample(range(len(c["context"])), 2)
        fa, fb = rng.choice(c["follow"]), rng.choice(c["follow"])
        add(base(ctx(c["context"][i], e, d, x), fa), base(ctx(c["context"][j], e, d, x), fb), True,
            "mt_history_reworded")
    for _ in range(per_kind):
        e, d, x = slots()
        t = rng.choice(c["context"])
        f = rng.choice(c["follow"])
        a = base(ctx(t, e, d, x), f)
        b = rng.choice(IRRELEVANT) + base(ctx(rng.choice(c["context"]), e, d, x), f)
        add(a, b, True, "mt_irrelevant_history")
    for _ in range(per_kind):
        e, d, x = slots()
        t = ctx(rng.choice(c["context"]), e, d, x)
        f = rng.choice(c["follow"])
        a = base(t, f)
        if rng.random() < 0.5:
            b = [("user", t), ("assistant", rng.choice(ASSISTANT_ACK)), ("user", rng.choice(CHATTER_BEFORE)),
                 ("assistant", "You're welcome!"), ("user", f)]
        else:
            b = base(t, rng.choice(CHATTER_PREFIX) + f[0].lower() + f[1:])
        add(a, b, True, "mt_extra_chatter")
    for _ in range(per_kind):
        e, d, x = slots()
        e2 = rng.choice([p for p in POOLS[c["pool"]] if p != e])
        t = rng.choice(c["context"])
        f = rng.choice(c["follow"])
        t2 = t if rng.random() < 0.6 else rng.choice(c["context"])
        add(base(ctx(t, e, d, x), f), base(ctx(t2, e2, d, x), f), False, "mt_context_swap")
    for _ in range(per_kind):
        e, d, x = slots()
        t = rng.choice(c["context"])
        f = rng.choice(c["follow"])
        if c["detail"]:
            d2 = rng.choice([p for p in DETAILS[c["detail"]] if p != d])
            b = base(ctx(t, e, d2, x), f)
        else:
            # the detail lives in the follow-up: another of its questions about the same thing
            others = [g for g in CONVS if g is not c and g["pool"] == c["pool"]]
            if not others:
                continue
            b = base(ctx(t, e, d, x), rng.choice(rng.choice(others)["follow"]))
        add(base(ctx(t, e, d, x), f), b, False, "mt_detail_swap")
    for _ in range(per_kind):
        e, d, x = slots()
        f = rng.choice(c["follow"])
        add(base(ctx(rng.choice(c["context"]), e, d, x), f), base(ctx(rng.choice(c["flip"]), e, d, x), f), False,
            "mt_intent_flip")
    return out


def split_of(index, rng_order):
    return SPLITS[rng_order[index % len(rng_order)]]


def generate():
    rng = random.Random(SEED)
    by_split = {s: [] for s in SPLITS}
    # Frames of each domain are dealt to the splits: 40% calibration, 20% validation,
    # 40% test (by frame, so that no wording crosses splits).
    domains = sorted({f["domain"] for f in FRAMES})
    deal = [0, 2, 1, 2, 0, 2, 0, 1, 2, 0]
    for d in domains:
        frames = [f for f in FRAMES if f["domain"] == d]
        rng.shuffle(frames)
        for k, f in enumerate(frames):
            split = SPLITS[deal[k % len(deal)]]
            # paraphrase, near repeat, negation, entity, number, scope
            per = [16, 9, 8, 8 if f["e"] else 0, 8 if f["n"] else 0, 6]
            # frames without an entity or quantity make up with more of the rest
            if not f["e"]:
                per[2] += 4
                per[5] += 4
            if not f["n"]:
                per[0] += 2
                per[2] += 2
                per[5] += 4
            by_split[split].extend(single_pairs(f, rng, per))
        convs = [c for c in CONVS if c["domain"] == d]
        rng.shuffle(convs)
        for k, c in enumerate(convs):
            split = SPLITS[[2, 0, 1, 2, 0][k % 5]]
            by_split[split].extend(conv_pairs(c, rng, 4))
    for s in SPLITS:
        rng.shuffle(by_split[s])
    return by_split


def render(pairs):
    return "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="fail if the files differ from a fresh run")
    ap.add_argument("--out", default=str(HERE), help="output folder")
    args = ap.parse_args()
    by_split = generate()
    bad = False
    for s in SPLITS:
        path = Path(args.out) / f"cache_pairs_{s}.jsonl"
        body = render(by_split[s])
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != body:
                print(f"{path} is out of date", file=sys.stderr)
                bad = True
        else:
            path.write_text(body, encoding="utf-8")
        single = [p for p in by_split[s] if not p["category"].startswith("mt_")]
        multi = [p for p in by_split[s] if p["category"].startswith("mt_")]
        digest = hashlib.sha256(body.encode()).hexdigest()[:12]
        print(f"{s}: {len(single)} single-turn, {len(multi)} multi-turn pairs, "
              f"{len({p['domain'] for p in by_split[s]})} domains, sha256 {digest}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
