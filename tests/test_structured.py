"""The structured shape sequence: deterministic, disjoint classes, distinct domains, known relations."""

from __future__ import annotations

import numpy as np
import pytest

from hyperlora.structured import FACTORS, Domain, relation_matrix, render, sequence, structured_tasks


def test_same_seed_same_images_other_seed_other_images():
    a = structured_tasks(2, seed=3, train_per_class=2, test_per_class=1, image_size=32)
    b = structured_tasks(2, seed=3, train_per_class=2, test_per_class=1, image_size=32)
    c = structured_tasks(2, seed=4, train_per_class=2, test_per_class=1, image_size=32)
    for x, y, z in zip(a, b, c, strict=True):
        assert [np.asarray(i).tolist() for i in x.train["image"]] == [np.asarray(i).tolist() for i in y.train["image"]]
        assert x.train["label"] == y.train["label"]
        assert np.asarray(x.train["image"][0]).tolist() != np.asarray(z.train["image"][0]).tolist()


def test_tasks_have_disjoint_four_class_label_sets_and_balanced_splits():
    tasks = structured_tasks(3, train_per_class=3, test_per_class=2, image_size=32)
    assert [task.name for task in tasks] == ["orientation-d00", "count-d01", "size-d02"]
    assert [task.classes for task in tasks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    for task in tasks:
        assert np.bincount(task.train["label"])[task.classes].tolist() == [3] * 4
        assert np.bincount(task.test["label"])[task.classes].tolist() == [2] * 4
        assert task.train[0]["image"].size == (32, 32) and task.train[0]["image"].mode == "RGB"


def test_twenty_domains_are_twenty_distinct_looks():
    domains = [Domain.of(i) for i in range(20)]
    assert len({(d.background, d.texture) for d in domains}) == 20
    assert len({(d.target, d.distractor) for d in domains}) == 20
    assert all(d.target != d.distractor for d in domains)


def test_sequence_cycles_factors_and_relations_mark_shared_factors():
    specs = sequence(5)
    assert [s.factor for s in specs] == ["orientation", "count", "size", "orientation", "count"]
    R = relation_matrix(specs)
    assert R.tolist() == [
        [1, 0, 0, 1, 0],
        [0, 1, 0, 0, 1],
        [0, 0, 1, 0, 0],
        [1, 0, 0, 1, 0],
        [0, 1, 0, 0, 1],
    ]
    assert [s.factor for s in sequence(10, FACTORS)] == [*FACTORS, *FACTORS]


def test_labels_set_the_asked_factor_and_only_it():
    """The factor's label moves the target; the domain alone sets the look (background pixel colour)."""
    rng = np.random.default_rng(0)
    domain = Domain.of(0)
    corner = [np.asarray(render("size", label, domain, rng))[0, 0] for label in range(4)]
    assert all((c == corner[0]).all() for c in corner)  # solid background: same corner colour whatever the label
    target = np.array(domain.target)

    def target_pixels(label: int) -> float:
        image = np.asarray(render("size", label, domain, np.random.default_rng(label))).astype(int)
        return float((np.abs(image - target).sum(-1) < 60).mean())

    assert target_pixels(0) < target_pixels(1) < target_pixels(2) < target_pixels(3)  # bigger target, more pixels


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: sequence(0), "num_tasks"),
        (lambda: sequence(2, ("colour",)), "factors"),
        (lambda: sequence(2, kind="random"), "kind"),
        (lambda: sequence(21, kind="split"), "glyphs for 20 tasks"),
        (lambda: render("glyph", 83, Domain.of(0), np.random.default_rng(0)), "label"),
        (lambda: render("colour", 0, Domain.of(0), np.random.default_rng(0)), "factor"),
        (lambda: render("size", 4, Domain.of(0), np.random.default_rng(0)), "label"),
    ],
)
def test_bad_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_mixed_and_domain_sequences_never_ignore_another_tasks_target_colour():
    for kind in ("mixed", "domain"):
        specs = sequence(20, FACTORS, kind=kind)
        looks = [spec.look for spec in specs]
        assert {look.target for look in looks}.isdisjoint({look.distractor for look in looks})
        assert len({(look.background, look.texture, look.target, look.distractor) for look in looks}) == 20
        assert (relation_matrix(specs) >= 0).all()
    assert {spec.factor for spec in sequence(6, ("count", "size"), kind="domain")} == {"count"}
    assert (relation_matrix(sequence(6, ("count", "size"), kind="domain")) == 1).all()


def test_the_conflict_sequence_keeps_the_first_colours_and_marks_their_conflicts():
    specs = sequence(5, kind="conflict")
    assert [spec.look for spec in specs] == [Domain.of(t) for t in range(5)]
    R = relation_matrix(specs)
    for t in range(4):  # each task's distractor colour is the next task's target colour
        assert specs[t].look.distractor == specs[t + 1].look.target
        assert R[t, t + 1] == R[t + 1, t] == -1
    assert np.array_equal(R, R.T) and (np.diag(R) == 1).all()


def test_a_validation_split_is_balanced_and_leaves_train_and_test_as_they_were():
    plain = structured_tasks(2, seed=1, train_per_class=2, test_per_class=2, image_size=32)
    tasks = structured_tasks(2, seed=1, train_per_class=2, test_per_class=2, validation_per_class=3, image_size=32)
    for a, b in zip(plain, tasks, strict=True):
        assert a.validation is None
        assert np.bincount(b.validation["label"])[b.classes].tolist() == [3] * 4
        for split in ("train", "test"):
            assert [np.asarray(i).tolist() for i in getattr(a, split)["image"]] == [
                np.asarray(i).tolist() for i in getattr(b, split)["image"]
            ]


def test_a_validation_split_with_classes_the_train_split_lacks_is_refused_by_name():
    from datasets import Dataset

    from hyperlora.data import Task

    task = structured_tasks(1, train_per_class=1, test_per_class=1, validation_per_class=1, image_size=32)[0]
    wrong = Dataset.from_dict({"image": task.validation["image"][:1], "label": [99]}, features=task.validation.features)
    with pytest.raises(ValueError, match="validation labels"):
        Task("t", task.train, task.test, wrong)


def test_the_split_sequence_asks_one_question_in_one_look_with_new_glyphs_per_task():
    specs = sequence(20, kind="split")
    assert len({spec.look for spec in specs}) == 1 and (relation_matrix(specs) == 1).all()
    glyphs = [value for spec in specs for value in spec.values]
    assert len(glyphs) == len(set(glyphs)) == 80  # class-incremental: every task brings four glyphs never seen
    tasks = structured_tasks(2, kind="split", train_per_class=2, test_per_class=1, image_size=32)
    assert [task.name for task in tasks] == ["glyph-d00-s00", "glyph-d00-s01"]
    assert [task.classes for task in tasks] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # the label decides the target glyph: the target-coloured ink differs between two classes drawn alike
    domain = specs[0].look
    ink = [
        np.abs(np.asarray(render("glyph", value, domain, np.random.default_rng(0))).astype(int) - domain.target).sum(-1)
        < 60
        for value in specs[0].values[:2]
    ]
    assert ink[0].any() and ink[1].any() and (ink[0] != ink[1]).any()


def test_later_tasks_can_bring_fewer_images_and_the_first_stays_as_it_was():
    full = structured_tasks(2, seed=2, train_per_class=3, test_per_class=1, image_size=32)
    fewer = structured_tasks(2, seed=2, train_per_class=3, test_per_class=1, later_train_per_class=1, image_size=32)
    assert [len(task.train) for task in fewer] == [12, 4]
    assert [np.asarray(i).tolist() for i in full[0].train["image"]] == [
        np.asarray(i).tolist() for i in fewer[0].train["image"]
    ]
