"""VLMEvalKit TSV loading and the benchmarks' official metrics on small hand-checked files.

Every TSV here is written by the test in VLMEvalKit's format (header row, tab-separated, base64
PNG images made with Pillow, rows that share an image holding the other row's index).
"""

import base64
import csv
import io
import math

import pytest
from PIL import Image

from tokengine.data.vlmevalkit import (
    BENCHMARKS,
    CAPTION_PROMPT,
    benchmark_name,
    build_prompt,
    load_image,
    load_tsv,
)
from tokengine.metrics import (
    bleu,
    caption_metrics,
    cider_d,
    extract_choice,
    extract_yes_no,
    relaxed_correct,
    rouge_l,
    score,
    tokenize_caption,
    vqa_normalize,
    vqa_score,
)


def png_b64(color=(255, 0, 0), size=(8, 6)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        for r in rows:
            w.writerow([r.get(h, "") for h in header])
    return path


def with_predictions(rows, predictions):
    assert len(rows) == len(predictions)
    return [dict(r, prediction=p) for r, p in zip(rows, predictions, strict=True)]


# --------------------------------------------------------------------------- loader
def test_benchmark_names_from_files():
    expected = {
        "MME.tsv": "MME",
        "POPE.tsv": "POPE",
        "TextVQA_VAL.tsv": "TextVQA",
        "ChartQA_TEST.tsv": "ChartQA",
        "SEEDBench_IMG.tsv": "SEEDBench_IMG",
        "ScienceQA_TEST.tsv": "ScienceQA",
        "HallusionBench.tsv": "HallusionBench",
        "COCO_VAL.tsv": "COCO",
        "OCRBench.tsv": "OCRBench",
        "AI2D_TEST.tsv": "AI2D",
        "RealWorldQA.tsv": "RealWorldQA",
        "MMStar.tsv": "MMStar",
        "SEEDBench2.tsv": "SEEDBench2",
        "SEEDBench2_Plus.tsv": "SEEDBench2_Plus",
        "OCRVQA_TEST.tsv": "OCRVQA",
        "/data/vlm/ocrvqa_testcore.tsv": "OCRVQA",
    }
    for name, bench in expected.items():
        assert benchmark_name(name) == bench, name
    assert set(expected.values()) == set(BENCHMARKS)


def mme_file(tmp_path):
    red, blue, green = png_b64((255, 0, 0)), png_b64((0, 0, 255)), png_b64((0, 255, 0), (5, 5))
    # Rows 2, 4 and 6 hold the index of the row with their image, as in VLMEvalKit's MME.tsv.
    rows = [
        dict(
            index=1,
            image=red,
            question="Is there a red square?",
            answer="Yes",
            category="existence",
        ),
        dict(index=2, image="1", question="Is there a cat?", answer="No", category="existence"),
        dict(
            index=3,
            image=blue,
            question="Is it blue? Please answer yes or no.",
            answer="Yes",
            category="existence",
        ),
        dict(index=4, image="3", question="Is it green?", answer="No", category="existence"),
        dict(
            index=5,
            image=green,
            question="Does the code print 3?",
            answer="Yes",
            category="code_reasoning",
        ),
        dict(
            index=6,
            image="5",
            question="Does the code print 4?",
            answer="No",
            category="code_reasoning",
        ),
    ]
    header = ["index", "image", "question", "answer", "category"]
    return write_tsv(tmp_path / "MME.tsv", header, rows)


def test_load_tsv_resolves_shared_images_and_decodes_on_demand(tmp_path):
    rows = load_tsv(mme_file(tmp_path))
    assert len(rows) == 6 and all(r["benchmark"] == "MME" for r in rows)
    assert [r["image_id"] for r in rows] == ["1", "1", "3", "3", "5", "5"]
    assert rows[1]["image"] == rows[0]["image"]  # the reference "1" was resolved
    img = load_image(rows[3])
    assert img.mode == "RGB" and img.size == (8, 6) and img.getpixel((0, 0)) == (0, 0, 255)
    assert load_image(rows[5]).size == (5, 5)
    assert build_prompt("MME", rows[0]) == "Is there a red square? Please answer yes or no."
    # A question that already asks for yes/no is not asked twice.
    assert build_prompt("MME", rows[2]) == "Is it blue? Please answer yes or no."


def test_mme_acc_plus_pairs_questions_by_image(tmp_path):
    rows = load_tsv(mme_file(tmp_path))
    preds = [
        "Yes, there is a red square.",  # right
        "No.",  # right         -> image 1: both right
        "yes",  # right
        "Yes, it is green.",  # wrong -> image 3: one right
        "Yes",  # right
        "Yes",  # wrong         -> image 5: one right
    ]
    res = score("MME", with_predictions(rows, preds))
    ex, code = res["categories"]["existence"], res["categories"]["code_reasoning"]
    # existence: acc = 3/4 = 75, acc+ = 1 of 2 images = 50 -> score 125
    assert ex["acc"] == pytest.approx(75.0) and ex["acc_plus"] == pytest.approx(50.0)
    assert ex["score"] == pytest.approx(125.0) and ex["images"] == 2
    # code_reasoning: acc = 1/2 = 50, acc+ = 0/1 = 0 -> score 50
    assert code["acc"] == pytest.approx(50.0) and code["acc_plus"] == pytest.approx(0.0)
    assert res["perception"] == pytest.approx(125.0)
    assert res["cognition"] == pytest.approx(50.0)
    assert res["overall"] == pytest.approx(175.0) and res["primary"] == "overall"
    assert "count" in res["absent_categories"]


# --------------------------------------------------------------------------- POPE
def test_pope_f1_precision_recall_yes_ratio(tmp_path):
    img = png_b64()
    spec = [  # (category, answer, prediction) -> extracted
        ("random", "Yes", "Yes, there is a dog."),  # Yes  TP
        ("random", "Yes", "No"),  # No   FN
        ("random", "No", "no"),  # No   TN
        ("random", "No", "Yes"),  # Yes  FP
        ("popular", "Yes", "yes"),  # Yes  TP
        ("popular", "No", "No, there isn't."),  # No   TN
        ("popular", "No", "I am not sure"),  # Unknown: wrong, not a yes
        ("popular", "Yes", "There is a cat in the image."),  # Unknown  FN
        ("adversarial,popular", "No", "No"),  # No, counted once per category (2 TN)
    ]
    rows = [
        dict(
            index=i, image=img if i == 0 else "0", question="Is there a dog?", answer=a, category=c
        )
        for i, (c, a, _) in enumerate(spec)
    ]
    path = write_tsv(
        tmp_path / "POPE.tsv", ["index", "image", "question", "answer", "category"], rows
    )
    loaded = load_tsv(path)
    assert build_prompt("POPE", loaded[0]) == "Is there a dog? Please answer yes or no."
    res = score("POPE", with_predictions(loaded, [p for _, _, p in spec]))
    # Overall (10 items after splitting "adversarial,popular"): TP 2, FP 1, FN 2.
    # precision 2/3, recall 2/4, F1 = 2 * (1/3) / (7/6) = 4/7; acc 6/10; yes-ratio 3/10.
    assert res["precision"] == pytest.approx(200 / 3)
    assert res["recall"] == pytest.approx(50.0)
    assert res["f1"] == pytest.approx(400 / 7)
    assert res["acc"] == pytest.approx(60.0)
    assert res["yes_ratio"] == pytest.approx(30.0)
    assert res["unknown"] == 2 and res["n"] == 10
    rnd, pop, adv = (res["categories"][c] for c in ("random", "popular", "adversarial"))
    # random: TP 1, FP 1, FN 1 -> P = R = F1 = 1/2; acc 2/4; yes 2/4
    assert (rnd["f1"], rnd["acc"], rnd["yes_ratio"]) == pytest.approx((50.0, 50.0, 50.0))
    # popular (5 items): TP 1, FP 0, FN 1 -> P 1, R 1/2, F1 2/3; acc 3/5; yes 1/5
    assert pop["f1"] == pytest.approx(200 / 3) and pop["acc"] == pytest.approx(60.0)
    assert pop["yes_ratio"] == pytest.approx(20.0)
    # adversarial: one TN -> no positives at all: P = R = F1 = 0, acc 100
    assert (adv["f1"], adv["acc"]) == pytest.approx((0.0, 100.0))


def test_yes_no_extraction():
    assert extract_yes_no("Yes.") == "Yes"
    assert extract_yes_no("NO!") == "No"
    assert extract_yes_no("Yes, there is no cat but a dog.") == "Yes"  # both words: first one
    assert extract_yes_no("There is a dog, so no.") == "No"
    assert extract_yes_no("There is a dog and no cat, yes") == "Unknown"
    assert extract_yes_no("maybe") == "Unknown"


# --------------------------------------------------------------------------- HallusionBench
def test_hallusionbench_aacc_facc_qacc(tmp_path):
    img = png_b64()
    # index = <l2-category>_<set>_<figure>_<question>; ids come from the index as in VLMEvalKit.
    spec = [  # (index, category, l2-category, answer, prediction, right?)
        ("VD_figure_0_0_0", "VD", "VD_figure", "Yes", "Yes, it is.", True),
        ("VD_figure_0_0_1", "VD", "VD_figure", "No", "No", True),
        ("VD_figure_0_1_0", "VD", "VD_figure", "No", "no", True),
        ("VD_figure_0_1_1", "VD", "VD_figure", "Yes", "No.", False),
        ("VS_chart_0_0_0", "VS", "VS_chart", "Yes", "I cannot tell", False),
        ("VS_chart_0_1_0", "VS", "VS_chart", "No", "No", True),
    ]
    rows = [
        dict(index=i, image=img, question="Is it?", answer=a, category=c, **{"l2-category": l2})
        for i, c, l2, a, _, _ in spec
    ]
    header = ["index", "image", "question", "answer", "category", "l2-category"]
    loaded = load_tsv(write_tsv(tmp_path / "HallusionBench.tsv", header, rows))
    res = score("HallusionBench", with_predictions(loaded, [s[4] for s in spec]))
    # aAcc: 4 of 6 questions right.
    # fAcc, per (l2, set, figure): VD_figure/0/0 [T,T] T; VD_figure/0/1 [T,F] F;
    #   VS_chart/0/0 [F] F; VS_chart/0/1 [T] T -> 2/4.
    # qAcc, per (l2, set, question): VD_figure/0/q0 [T,T] T; VD_figure/0/q1 [T,F] F;
    #   VS_chart/0/q0 [F,T] F -> 1/3.
    assert res["aAcc"] == pytest.approx(400 / 6)
    assert res["fAcc"] == pytest.approx(50.0)
    assert res["qAcc"] == pytest.approx(100 / 3)
    vd, vs = res["splits"]["VD"], res["splits"]["VS"]
    assert (vd["aAcc"], vd["fAcc"], vd["qAcc"]) == pytest.approx((75.0, 50.0, 50.0))
    assert (vs["aAcc"], vs["fAcc"], vs["qAcc"]) == pytest.approx((50.0, 50.0, 0.0))
    assert res["splits"]["VD_figure"]["qAcc"] == pytest.approx(50.0)
    # Explicit set_id / figure_id / question_id columns (and category + subcategory instead of
    # l2-category) give the same groups.
    explicit = []
    for s in spec:
        _, set_id, fig, q = s[0].rsplit("_", 3)
        explicit.append(
            dict(
                index=str(len(explicit)),
                category=s[1],
                subcategory=s[2].split("_")[1],
                set_id=set_id,
                figure_id=fig,
                question_id=q,
                answer=s[3],
                prediction=s[4],
            )
        )
    res2 = score("HallusionBench", explicit)
    assert (res2["aAcc"], res2["fAcc"], res2["qAcc"]) == pytest.approx(
        (res["aAcc"], res["fAcc"], res["qAcc"])
    )


# --------------------------------------------------------------------------- multiple choice
def test_multiple_choice_extraction_from_messy_text(tmp_path):
    img = png_b64()
    spec = [  # (options A-D, answer, prediction, category)
        (("cat", "dog", "bird", "fish"), "B", "The answer is (B).", "c1"),  # right
        (("red", "cat", "blue", ""), "B", "b) cat", "c1"),  # right, D dropped
        (("green", "blue", "red", "dark red"), "C", "Answer: C. red", "c1"),  # right
        (("2", "12", "3", "4"), "B", "12", "c1"),  # right: option text, not "2"
        (("apple", "banana", "cherry", "grape"), "D", "I think the fruit is a grape.", "c2"),
        (("yes", "no", "", ""), "A", "I cannot tell from the image.", "c2"),  # unparsed
        (("one", "two", "three", "four"), "C", "B", "c2"),  # wrong
        (("left", "right", "up", "down"), "A", "A", "c2"),  # right
    ]
    rows = []
    for i, (opts, ans, _, cat) in enumerate(spec):
        rows.append(
            dict(
                index=i,
                image=img,
                question=f"Question {i}?",
                answer=ans,
                category=cat,
                hint="Look at the left side." if i == 7 else "",
                **dict(zip("ABCD", opts, strict=True)),
            )
        )
    header = ["index", "image", "question", "hint", "A", "B", "C", "D", "answer", "category"]
    loaded = load_tsv(write_tsv(tmp_path / "AI2D_TEST.tsv", header, rows))
    assert "D" not in loaded[1] and "C" not in loaded[5]
    assert build_prompt("AI2D", loaded[1]) == (
        "Question 1?\nA. red\nB. cat\nC. blue\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert build_prompt("AI2D", loaded[7]) == (
        "Look at the left side.\nQuestion 7?\nA. left\nB. right\nC. up\nD. down\n"
        "Answer with the option's letter from the given choices directly."
    )
    res = score("AI2D", with_predictions(loaded, [s[2] for s in spec]))
    # right: rows 0, 1, 2, 3, 4, 7 -> 6/8; c1 4/4, c2 2/4; one answer unreadable.
    assert res["accuracy"] == pytest.approx(75.0)
    assert res["categories"] == pytest.approx({"c1": 100.0, "c2": 50.0})
    assert res["unparsed"] == 1


@pytest.mark.parametrize(
    "text,expected",
    [
        ("The answer is (B).", "B"),
        ("B", "B"),
        ("(c)", "C"),
        ("b) cat", "B"),
        ("Answer: C. red", "C"),
        ("The correct option is (d)", "D"),
        ("**B**", "B"),
        ("Option A is wrong; the answer is C.", "C"),
        ("dog", "B"),  # option text
        ("dark red", "D"),  # "red" inside "dark red" is not a second match
        ("A cat sits there.", "A"),  # "A" is an article; the text "cat" decides
        ("the answer is a cat", "A"),
        ("C or D", None),
        ("I don't know.", None),
        ("", None),
    ],
)
def test_extract_choice(text, expected):
    choices = {"A": "cat", "B": "dog", "C": "red", "D": "dark red"}
    assert extract_choice(text, choices) == expected


# --------------------------------------------------------------------------- VQA
def test_textvqa_vqa_accuracy(tmp_path):
    img = png_b64()
    spec = [  # (10 answers, prediction) -> VQA accuracy
        # 2 matches: the 2 matching leave-one-out subsets hold 1 match (1/3), the other 8 hold
        # 2 (2/3): (2 * 1/3 + 8 * 2/3) / 10 = 0.6
        (["2", "2"] + ["3"] * 8, "Two."),
        # 3 matches: (3 * 2/3 + 7 * 1) / 10 = 0.9
        (["stop"] * 3 + ["go"] * 7, "STOP"),
        # 4 matches after normalisation ("the Coca-Cola" -> "coca cola"): 1.0
        (["coca cola"] * 4 + ["pepsi"] * 6, "the Coca-Cola"),
        # 1 match ("dont" -> "don't"): (1 * 0 + 9 * 1/3) / 10 = 0.3
        (["don't"] + ["no"] * 9, "dont"),
    ]
    rows = [
        dict(index=i, image=img, question="What is written?", answer=str(a))
        for i, (a, _) in enumerate(spec)
    ]
    loaded = load_tsv(
        write_tsv(tmp_path / "TextVQA_VAL.tsv", ["index", "image", "question", "answer"], rows)
    )
    assert build_prompt("TextVQA", loaded[0]) == (
        "What is written?\nAnswer the question using a single word or phrase."
    )
    for (answers, pred), expected in zip(spec, [0.6, 0.9, 1.0, 0.3], strict=True):
        assert vqa_score(pred, answers) == pytest.approx(expected)
    res = score("TextVQA", with_predictions(loaded, [p for _, p in spec]))
    assert res["vqa_accuracy"] == pytest.approx(70.0)  # mean of 0.6, 0.9, 1.0, 0.3
    assert res["primary"] == "vqa_accuracy"


def test_vqa_normalisation():
    assert vqa_normalize("The Dog's, bone!") == "dog's bone"
    assert vqa_normalize("1,000.5") == "1000.5"  # digit commas dropped, decimal point kept
    assert vqa_normalize("Three cats.") == "3 cats"
    assert vqa_normalize("isnt it") == "isn't it"


def test_ocrvqa_exact_match(tmp_path):
    img = png_b64()
    spec = [
        (["Stephen King"], "stephen king"),
        (["Stephen King"], "Stephen King."),
        (["Cookbooks", "Cooking"], "Travel"),
    ]
    rows = [
        dict(index=i, image=img, question="Who wrote this book?", answer=str(a))
        for i, (a, _) in enumerate(spec)
    ]
    loaded = load_tsv(
        write_tsv(tmp_path / "OCRVQA_TEST.tsv", ["index", "image", "question", "answer"], rows)
    )
    res = score("OCRVQA", with_predictions(loaded, [p for _, p in spec]))
    # VLMEvalKit: exact case-insensitive match -> 1/3; after VQA normalisation the trailing
    # period no longer matters -> 2/3.
    assert res["accuracy"] == pytest.approx(100 / 3)
    assert res["normalized_accuracy"] == pytest.approx(200 / 3)


def test_chartqa_relaxed_accuracy_at_the_5_percent_edge(tmp_path):
    img = png_b64()
    spec = [  # (answer, prediction, split, right?)
        ("100", "105", "human", True),  # |105 - 100| / 100 = 0.05 exactly: inside
        ("100", "105.01", "human", False),  # 0.0501
        ("100", "95", "human", True),
        ("100", "94.99", "augmented", False),
        ("Yes", "yes.", "augmented", True),  # text: case and trailing period ignored
        ("12%", "0.12", "augmented", True),  # "12%" reads as 0.12
    ]
    rows = [
        dict(index=i, image=img, question="Value?", answer=a, split=s)
        for i, (a, _, s, _) in enumerate(spec)
    ]
    loaded = load_tsv(
        write_tsv(
            tmp_path / "ChartQA_TEST.tsv", ["index", "image", "question", "answer", "split"], rows
        )
    )
    for a, p, _, right in spec:
        assert relaxed_correct(a, p) is right, (a, p)
    res = score("ChartQA", with_predictions(loaded, [s[1] for s in spec]))
    assert res["relaxed_accuracy"] == pytest.approx(400 / 6)
    assert res["splits"] == pytest.approx({"augmented": 200 / 3, "human": 200 / 3})
    assert relaxed_correct("1,234", "1234") and not relaxed_correct("0", "0.0")


def test_ocrbench_final_score(tmp_path):
    img = png_b64()
    hme = "Handwritten Mathematical Expression Recognition"
    spec = [  # (category, answers, prediction, right?)
        ("Regular Text Recognition", ["CENTRE"], "The word is centre.", True),  # substring
        (hme, ["x ^ { 2 } + 1"], "x^{2}+1", True),  # HME: spaces removed on both sides
        (hme, ["x + y"], "X+Y", False),  # HME: case-sensitive
        ("Scene Text-centric VQA", ["stop", "stop sign"], "It says STOP", True),
        ("Doc-oriented VQA", ["42"], "forty two", False),
    ]
    rows = [
        dict(index=i, image=img, question="What is written?", answer=str(a), category=c)
        for i, (c, a, _, _) in enumerate(spec)
    ]
    loaded = load_tsv(
        write_tsv(
            tmp_path / "OCRBench.tsv", ["index", "image", "question", "answer", "category"], rows
        )
    )
    res = score("OCRBench", with_predictions(loaded, [s[2] for s in spec]))
    assert res["final_score"] == 3 and res["primary"] == "final_score"
    assert res["accuracy"] == pytest.approx(60.0)
    assert res["text_recognition"] == 1
    assert res["categories"][hme] == 1 and res["category_totals"][hme] == 2
    assert res["categories"]["Doc-oriented VQA"] == 0


# --------------------------------------------------------------------------- captions
def test_bleu_rouge_by_hand():
    refs = [
        [tokenize_caption("a cat sits on the mat"), tokenize_caption("there is a cat on the mat")]
    ]
    hyp = [tokenize_caption("The cat sits on the mat.")]
    assert hyp[0] == ["the", "cat", "sits", "on", "the", "mat"]
    # Clipped n-gram precisions against the references: 1-grams 5/6 ("the" twice, once in any
    # reference), 2-grams 4/5, 3-grams 3/4, 4-grams 2/3; closest reference length 6 -> no
    # brevity penalty. BLEU-n = geometric mean: 5/6, sqrt(2/3), 0.5^(1/3), (1/3)^(1/4).
    # pycocoevalcap 1.2 Bleu(4) gives 0.8333333331, 0.8164965806, 0.7937005257, 0.7598356853;
    # nltk 3.9 corpus_bleu gives 0.8333333333, 0.8164965809, 0.7937005260, 0.7598356857.
    b = bleu(refs, hyp)
    expected = [5 / 6, math.sqrt(2 / 3), 0.5 ** (1 / 3), (1 / 3) ** 0.25]
    assert b == pytest.approx(expected, rel=1e-8)
    # ROUGE-L: LCS with ref 1 is 5 ("cat sits on the mat"): P = R = 5/6 -> F = 5/6
    # (pycocoevalcap Rouge: 0.8333333333).
    assert rouge_l(refs, hyp) == pytest.approx(5 / 6)
    # CIDEr-D of a one-image corpus is 0: every n-gram's idf is log(1/1) (pycocoevalcap: 0.0).
    assert cider_d(refs, hyp)[0] == 0.0


def test_cider_by_hand():
    # Two images, caption = its only reference, no shared words: every n-gram has idf log 2, so
    # each n-gram order with n-grams has cosine 1 and the length penalty is exp(0) = 1.
    # 2 words: orders 1, 2 -> mean over n = 1..4 is 2/4, times 10 -> 5.0.
    refs = [[["red", "bus"]], [["two", "dogs"]]]
    assert cider_d(refs, [["red", "bus"], ["two", "dogs"]])[1] == pytest.approx([5.0, 5.0])
    # 4 words: all four orders -> 10.0.
    refs4 = [[["a", "red", "bus", "stops"]], [["two", "dogs", "play", "outside"]]]
    assert cider_d(refs4, [r[0] for r in refs4])[0] == pytest.approx(10.0)


def test_coco_caption_metrics(tmp_path):
    img = png_b64()
    refs = [
        ["a cat sits on the mat", "there is a cat on the mat"],
        ["A dog runs.", "a brown dog is running"],
    ]
    hyps = ["The cat sits on the mat.", "a dog is running"]
    rows = [dict(index=i, image=img, answer=str(r)) for i, r in enumerate(refs)]
    loaded = load_tsv(write_tsv(tmp_path / "COCO_VAL.tsv", ["index", "image", "answer"], rows))
    assert build_prompt("COCO", loaded[0]) == CAPTION_PROMPT
    res = score("COCO", with_predictions(loaded, hyps))
    # pycocoevalcap 1.2 (Bleu(4), Rouge(), Cider()) on the same tokens gives
    # BLEU 0.8999999999, 0.8874119674, 0.8067143229, 0.7157845613; ROUGE-L 0.8523809524;
    # CIDEr 4.3028517169 (per image 5.2645034582, 3.3411999756);
    # nltk 3.9 corpus_bleu: 0.9, 0.8874119675, 0.8067143230, 0.7157845614.
    expected = {
        "bleu_1": 0.8999999999100001,
        "bleu_2": 0.8874119673651086,
        "bleu_3": 0.806714322906951,
        "bleu_4": 0.7157845612568086,
        "rouge_l": 0.8523809523809524,
        "cider": 4.302851716901922,
    }
    for k, v in expected.items():
        assert res[k] == pytest.approx(v, rel=1e-9), k
    assert res == pytest.approx(dict(res, **caption_metrics(refs, hyps)))


# --------------------------------------------------------------------------- errors
def test_missing_file_is_named(tmp_path):
    path = tmp_path / "MME.tsv"
    with pytest.raises(FileNotFoundError, match="MME.tsv"):
        load_tsv(path)


def test_missing_columns_are_named(tmp_path):
    path = write_tsv(
        tmp_path / "AI2D_TEST.tsv",
        ["index", "image", "question", "A"],
        [dict(index=0, image=png_b64(), question="q", A="x")],
    )
    with pytest.raises(ValueError, match=r"AI2D_TEST\.tsv.*\['answer', 'B'\]"):
        load_tsv(path)


def test_unknown_benchmark_lists_known_ones(tmp_path):
    path = write_tsv(
        tmp_path / "MMBench_DEV_EN.tsv",
        ["index", "image", "question", "answer"],
        [dict(index=0, image=png_b64(), question="q", answer="A")],
    )
    with pytest.raises(ValueError, match="known benchmarks: MME, POPE, HallusionBench"):
        load_tsv(path)
    with pytest.raises(ValueError, match="unknown benchmark 'VQAv2'.*TextVQA"):
        score("VQAv2", [dict(index=0, answer="a", prediction="a")])
    with pytest.raises(ValueError, match="known benchmarks"):
        build_prompt("MME-RealWorld", {"question": "q"})
    # An explicit benchmark overrides the file name.
    rows = load_tsv(path, benchmark="TextVQA_VAL")
    assert rows[0]["benchmark"] == "TextVQA"


def test_bad_rows(tmp_path):
    path = write_tsv(
        tmp_path / "POPE.tsv",
        ["index", "image", "question", "answer"],
        [dict(index=0, image="7", question="q", answer="Yes")],
    )
    with pytest.raises(ValueError, match="neither image data nor the index"):
        load_tsv(path)
    with pytest.raises(ValueError, match="lacks \\['prediction'\\]"):
        score("POPE", [dict(index=0, answer="Yes")])
    with pytest.raises(ValueError, match="no rows"):
        score("POPE", [])
