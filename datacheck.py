"""The data check run before training: what in a run's splits could make its scores mislead.

    python finetune.py --check-data --data SMSSpamCollection       # the full report, no training

Texts are compared after normalising whitespace and case (`normalise`). Per split: exact
duplicates, empty and one-token texts, texts cut at max_length, and class shares; across splits:
the same text in two splits (a leak: a test score on texts the model trained on), counted per pair
with up to three examples; and the same text under different labels. `check` returns the report
(a dict, written to the run folder as data-check.json), `summary` its one line for the log,
`report_lines` the whole of it. It warns and never changes a split; for own files,
`dedup_records` (--dedup) drops exact duplicates before the split, and `record_conflicts` names
the rows of texts given two labels.
"""

from collections import defaultdict

SHOWN = 3  # examples shown per finding
SHOWN_CHARS = 80  # characters of an example text shown


def normalise(text):
    """The form texts are compared in: runs of whitespace as one space, ends trimmed, case
    folded ("Ok  lar" and "ok lar" are the same text)."""
    return " ".join(str(text).split()).casefold()


def _shown(text):
    text = " ".join(str(text).split())
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


def check(splits, class_names, lengths=None, cut=None, max_length=None):
    """The data check of a run's splits: {split name: [(label id, text)]}, in split order.
    `lengths` ({split: token count of each text, after any cut}) and `cut` ({split: how many
    texts max_length cut}) add the one-token and cut counts. Returns the report as a dict."""
    names = list(splits)
    report = {"normalised": "whitespace collapsed, case folded", "max_length": max_length,
              "splits": {}, "leaks": {}, "conflicts": {}}
    where = {}  # split -> {normalised text: [indices]}
    for name in names:
        rows = splits[name]
        seen = defaultdict(list)
        for i, (_, text) in enumerate(rows):
            seen[normalise(text)].append(i)
        where[name] = seen
        repeated = [(t, ix) for t, ix in seen.items() if len(ix) > 1]
        n = len(rows)
        counts = [sum(label == k for label, _ in rows) for k in range(len(class_names))]
        s = {"examples": n,
             "classes": {c: {"count": k, "share": k / n if n else 0.0}
                         for c, k in zip(class_names, counts)},
             "duplicates": {"examples": sum(len(ix) - 1 for _, ix in repeated),
                            "texts": len(repeated),
                            "shown": [{"text": _shown(rows[ix[0]][1]), "copies": len(ix)}
                                      for _, ix in sorted(repeated, key=lambda r: -len(r[1]))
                                      [:SHOWN]]},
             "empty": len(seen.get("", []))}
        if lengths is not None and name in lengths:
            s["one_token"] = sum(1 for k in lengths[name] if k == 1)
        if cut is not None and name in cut:
            s["cut"] = {"examples": cut[name], "share": cut[name] / n if n else 0.0}
        report["splits"][name] = s
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = [t for t in where[b] if t in where[a]]
            n_b = sum(len(where[b][t]) for t in shared)
            report["leaks"][f"{a}/{b}"] = {
                "texts": len(shared), "examples": n_b,  # examples of the second split
                "share": n_b / len(splits[b]) if splits[b] else 0.0,
                "shown": [_shown(splits[b][where[b][t][0]][1]) for t in shared[:SHOWN]]}
    labels = defaultdict(lambda: defaultdict(list))  # text -> class -> ["split:index"]
    for name in names:
        for t, ix in where[name].items():
            for i in ix:
                labels[t][class_names[splits[name][i][0]]].append(f"{name}:{i}")
    conflicting = [(t, dict(by)) for t, by in labels.items() if len(by) > 1]
    report["conflicts"] = {"texts": len(conflicting), "examples": [
        {"text": _shown(t), "labels": by} for t, by in conflicting]}
    return report


def _count(n, what):
    return f"{n:,} {what}{'s' * (n != 1)}"


def summary(report, where="data-check.json"):
    """The log's one line about the report."""
    splits, leaks = report["splits"], report["leaks"]
    dup = sum(s["duplicates"]["examples"] for s in splits.values())
    leaked = {pair: v["examples"] for pair, v in leaks.items() if v["examples"]}
    parts = [f"{_count(dup, 'repeated text')} within splits",
             f"{_count(sum(leaked.values()), 'example')} whose text is in an earlier split"
             + (f" ({', '.join(f'{p} {n}' for p, n in leaked.items())})" if leaked else ""),
             f"{_count(report['conflicts']['texts'], 'text')} under two labels"]
    empty = sum(s["empty"] for s in splits.values())
    one = sum(s.get("one_token", 0) for s in splits.values())
    parts.append(f"{empty} empty, {one} of one token")
    if report["max_length"] is not None and any("cut" in s for s in splits.values()):
        cut = sum(s["cut"]["examples"] for s in splits.values() if "cut" in s)
        parts.append(f"{cut or 'none'} cut at max_length {report['max_length']}")
    return f"Data check: {'; '.join(parts)} (the whole report: {where})"


def _places(labels, prefix):
    """"ham: train:3, test:7; spam: train:9": where a text is found under each label."""
    return "; ".join(f"{k}: {prefix}" + ", ".join(map(str, v[:SHOWN])) +
                     (f" and {len(v) - SHOWN} more" if len(v) > SHOWN else "")
                     for k, v in labels.items())


def report_lines(report):
    """The whole report, as lines to print."""
    lines = [f"Data check (texts compared with {report['normalised']}):"]
    for name, s in report["splits"].items():
        shares = ", ".join(f"{c} {v['count']} ({v['share']*100:.1f}%)"
                           for c, v in s["classes"].items())
        lines.append(f"  {name}: {s['examples']:,} examples; classes: {shares}")
        d = s["duplicates"]
        lines.append(f"    repeated texts: {d['examples']:,} extra copies of {d['texts']:,} "
                     "texts")
        for e in d["shown"]:
            lines.append(f"      {e['copies']}x  {e['text']}")
        extra = f"empty: {s['empty']}"
        if "one_token" in s:
            extra += f"; one token: {s['one_token']}"
        if "cut" in s:
            extra += (f"; cut at max_length {report['max_length']}: {s['cut']['examples']:,} "
                      f"({s['cut']['share']*100:.1f}%)")
        lines.append(f"    {extra}")
    lines.append("  the same text in two splits (examples of the second split):")
    for pair, v in report["leaks"].items():
        lines.append(f"    {pair}: {v['examples']:,} examples ({v['share']*100:.1f}% of "
                     f"{pair.split('/')[1]}), {v['texts']:,} distinct texts")
        for text in v["shown"]:
            lines.append(f"      {text}")
    c = report["conflicts"]
    lines.append(f"  the same text under different labels: {c['texts']:,}")
    for e in c["examples"][:SHOWN]:
        lines.append(f"    {e['text']}  ({_places(e['labels'], '')})")
    for f in report.get("files", []):
        lines.append(f"  {f['file']}: {_count(f['texts'], 'text')} under two labels, by row:")
        for e in f["examples"][:SHOWN]:
            lines.append(f"    {e['text']}  ({_places(e['labels'], 'rows ')})")
    return lines


# ----------------------------------------------------------------------------------- own files

def dedup_records(records):
    """--dedup: `records` (data.Record, in file order) without the exact duplicates: rows whose
    normalised text and label an earlier row has. Returns (kept, how many were dropped). Rows
    of one text under two labels are kept, for the report to name."""
    seen, kept = set(), []
    for r in records:
        key = (normalise(r.text), r.label)
        if key not in seen:
            seen.add(key)
            kept.append(r)
    return kept, len(records) - len(kept)


def record_conflicts(records, path):
    """The texts of one file given two labels or more, with their rows: {"file", "texts",
    "examples": [{"text", "labels": {label: [rows]}}]}."""
    by = defaultdict(lambda: defaultdict(list))
    for r in records:
        by[normalise(r.text)][str(r.label)].append(r.row)
    found = [(t, labels) for t, labels in by.items() if len(labels) > 1]
    return {"file": str(path), "texts": len(found),
            "examples": [{"text": _shown(t), "labels": dict(labels)} for t, labels in found]}


def check_datasets(splits, datasets, class_names, conflicts=()):
    """`check` of a run's splits with what their data.TextDatasets know: each text's tokens
    (after any cut), how many were cut and at what max_length; `conflicts`: record_conflicts
    of the user's files, added to the report as "files"."""
    report = check(splits, class_names,
                   lengths={n: ds.lengths() for n, ds in datasets.items()},
                   cut={n: len(ds.cut) for n, ds in datasets.items()},
                   max_length=next(iter(datasets.values())).max_length)
    report["files"] = [c for c in conflicts if c["texts"]]
    return report


def check_run(labelled, datasets, say=print):
    """finetune.py's step 4b: check_datasets of the run's data.LabelledData and datasets, its
    summary line to `say`. Returns the report (data-check.json)."""
    report = check_datasets(labelled.splits, datasets, labelled.class_names, labelled.conflicts)
    say(summary(report))
    return report


def full_report(labelled, datasets):
    """--check-data's text: check_datasets of a run's data.LabelledData and datasets, whole."""
    report = check_datasets(labelled.splits, datasets, labelled.class_names, labelled.conflicts)
    return "\n".join(report_lines(report))
