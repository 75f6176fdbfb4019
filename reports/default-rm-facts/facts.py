"""Write facts.jsonl: matched pairs of a correct and a wrong simple fact, in two forms (a short
answer and a sentence), so that length and form cannot decide (see QUESTION.txt).

    python reports/default-rm-facts/facts.py   # writes facts.jsonl beside it
"""

import json
from pathlib import Path

# (question, sentence with {} for the answer, correct, wrong)
FACTS = [
    ("What is the capital of Italy?", "The capital of Italy is {}.", "Rome", "Milan"),
    ("What is the capital of Canada?", "The capital of Canada is {}.", "Ottawa", "Toronto"),
    ("What is the capital of Australia?", "The capital of Australia is {}.", "Canberra", "Sydney"),
    ("What is the capital of Germany?", "The capital of Germany is {}.", "Berlin", "Munich"),
    ("What is the capital of Egypt?", "The capital of Egypt is {}.", "Cairo", "Alexandria"),
    ("What is the capital of Spain?", "The capital of Spain is {}.", "Madrid", "Barcelona"),
    ("What is the capital of Russia?", "The capital of Russia is {}.", "Moscow", "Saint Petersburg"),
    ("What is the capital of Kenya?", "The capital of Kenya is {}.", "Nairobi", "Mombasa"),
    ("Who wrote Pride and Prejudice?", "Pride and Prejudice was written by {}.", "Jane Austen", "Charles Dickens"),
    ("Who wrote War and Peace?", "War and Peace was written by {}.", "Leo Tolstoy", "Mark Twain"),
    ("Who painted The Starry Night?", "The Starry Night was painted by {}.", "Vincent van Gogh", "Claude Monet"),
    ("Who composed the Moonlight Sonata?", "The Moonlight Sonata was composed by {}.", "Ludwig van Beethoven", "Johann Strauss"),
    ("Who developed the theory of general relativity?", "The theory of general relativity was developed by {}.", "Albert Einstein", "Isaac Newton"),
    ("Who was the first President of the United States?", "The first President of the United States was {}.", "George Washington", "Abraham Lincoln"),
    ("Which planet is closest to the Sun?", "The planet closest to the Sun is {}.", "Mercury", "Neptune"),
    ("Which planet is known as the Red Planet?", "The planet known as the Red Planet is {}.", "Mars", "Venus"),
    ("What gas do plants take from the air for photosynthesis?", "For photosynthesis, plants take {} from the air.", "carbon dioxide", "helium"),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is {}.", "Au", "Ag"),
    ("At what temperature does water boil at sea level, in Celsius?", "At sea level, water boils at {}.", "100 °C", "50 °C"),
    ("How many continents are there?", "There are {} continents.", "seven", "twelve"),
    ("How many legs does a spider have?", "A spider has {} legs.", "eight", "six"),
    ("How many minutes are in an hour?", "An hour has {} minutes.", "sixty", "one hundred"),
    ("What is 7 times 8?", "7 times 8 is {}.", "56", "54"),
    ("What is 100 divided by 4?", "100 divided by 4 is {}.", "25", "20"),
    ("What is 9 plus 6?", "9 plus 6 is {}.", "15", "13"),
    ("In which year did the Second World War end?", "The Second World War ended in {}.", "1945", "1962"),
    ("What is the largest ocean on Earth?", "The largest ocean on Earth is {}.", "the Pacific Ocean", "the Arctic Ocean"),
    ("What is the tallest mountain in the world?", "The tallest mountain in the world is {}.", "Mount Everest", "Mont Blanc"),
    ("What is the longest river in South America?", "The longest river in South America is {}.", "the Amazon", "the Thames"),
    ("What is the largest mammal?", "The largest mammal is {}.", "the blue whale", "the horse"),
    ("What language is mainly spoken in Brazil?", "The main language of Brazil is {}.", "Portuguese", "German"),
    ("What is the currency of Japan?", "The currency of Japan is {}.", "the yen", "the euro"),
    ("Which organ pumps blood through the body?", "The organ that pumps blood through the body is {}.", "the heart", "the liver"),
    ("At what temperature does water freeze, in Celsius?", "Water freezes at {}.", "0 °C", "20 °C"),
    ("How many sides does a triangle have?", "A triangle has {} sides.", "three", "five"),
    ("What is the square root of 81?", "The square root of 81 is {}.", "9", "7"),
    ("Which element has the chemical symbol O?", "The element with the chemical symbol O is {}.", "oxygen", "iron"),
    ("What do bees make?", "Bees make {}.", "honey", "milk"),
    ("In which country do kangaroos live in the wild?", "Kangaroos live in the wild in {}.", "Australia", "Norway"),
    ("Who discovered penicillin?", "Penicillin was discovered by {}.", "Alexander Fleming", "Louis Pasteur"),
]


def short(answer: str) -> str:
    return answer[0].upper() + answer[1:] + "."


def main() -> None:
    rows = []
    for question, sentence, correct, wrong in FACTS:
        rows.append({"prompt": question, "chosen": short(correct), "rejected": short(wrong), "category": "short"})
        rows.append({"prompt": question, "chosen": sentence.format(correct), "rejected": sentence.format(wrong),
                     "category": "sentence"})
    out = Path(__file__).with_name("facts.jsonl")
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{len(rows)} pairs -> {out}")


if __name__ == "__main__":
    main()
