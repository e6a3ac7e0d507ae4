"""MMLU documents from a local file: answers given as an index (0-3) or a letter (A-D) become the index."""

LETTERS = "ABCD"


def process_docs(dataset):
    def normalised(doc):
        answer = doc["answer"]
        if isinstance(answer, str):
            letter = answer.strip().upper()
            answer = LETTERS.index(letter) if len(letter) == 1 and letter in LETTERS else int(letter)
        if len(doc["choices"]) != 4 or not 0 <= answer < 4:
            raise ValueError(f"an MMLU question needs 4 choices and an answer in 0-3 or A-D, got {doc!r}")
        return {"answer": answer}

    return dataset.map(normalised)
