"""The chapter's code, transcribed, with the book's own changes for the experiments table.

`reference_run` runs chapter 6's procedure step for step (sections 6.3-6.8: seeds, loaders, model,
head, the look before training, `train_classifier_simple`, the final accuracies), with each
experiment done the way the book does it (another position or the mean of all positions in the
`[:, -1, :]` lines, the causal mask dropped, other layers unfrozen, appendix E's LoRA, other
padding, gradient accumulation, an ignored label). It shares nothing with finetune.py but the data
pipeline and the plain GPT-2 modules (the chapter's own formulas), so a run of ours can be checked
against it line for line. Not a test module: the tests import it.
"""

import math
import re

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import data
import gpt

# The lines the chapter prints (the look before training, each evaluation, each epoch's
# accuracies, the final accuracies); the others (run folder, sizes, timings) are ours alone.
CHAPTER_LINE = re.compile(
    r"^(?:(?:Training|Validation|Test) (?:accuracy|loss): \d+\.\d+%?"
    r"|Ep \d+ \(Step \d{6}\): Train loss \d+\.\d{3}, Val loss \d+\.\d{3}"
    r"|Training accuracy: \d+\.\d\d% \| Validation accuracy: \d+\.\d\d%)$")


def chapter_lines(out):
    """The chapter's lines of a printed log, in order."""
    return [line for line in out.splitlines() if CHAPTER_LINE.match(line)]


class Recording(Dataset):
    """A dataset that notes which items are read, so the final pass's coverage is observed."""

    def __init__(self, base):
        self.base, self.seen = base, []

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.seen.append(i)
        return self.base[i]


class LoRALayer(torch.nn.Module):  # appendix E
    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        self.A = torch.nn.Parameter(torch.empty(in_dim, rank))
        torch.nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = torch.nn.Parameter(torch.zeros(rank, out_dim))
        self.alpha = alpha

    def forward(self, x):
        return self.alpha * (x @ self.A @ self.B)


class LinearWithLoRA(torch.nn.Module):  # appendix E
    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha)

    def forward(self, x):
        return self.linear(x) + self.lora(x)


def replace_linear_with_lora(model, rank, alpha):  # appendix E
    for name, module in model.named_children():
        if isinstance(module, torch.nn.Linear):
            setattr(model, name, LinearWithLoRA(module, rank, alpha))
        else:
            replace_linear_with_lora(module, rank, alpha)


def select(position, average, pad_id=data.PAD_ID):
    """The experiment's replacement for the chapter's `model(input_batch)[:, -1, :]`."""
    def logits_of(model, input_batch):
        out = model(input_batch)  # (B, T, classes)
        if average:
            return out.mean(dim=1)
        if position == "first":
            return out[:, 0, :]
        if position == "flexible":  # the last token that is not padding
            last = (input_batch != pad_id).sum(dim=1) - 1
            return out[torch.arange(len(out)), last]
        return out[:, -1, :]
    return logits_of


def reference_run(weights, raw_path, *, seed=123, position="last", average=False, causal=True,
                  trainable="last_block", lora_rank=16, lora_alpha=16, context_length=None,
                  pad=True, batch_size=8, accumulation_steps=1, ignore_index=-100, lr=5e-5,
                  weight_decay=0.1, num_epochs=5, eval_freq=50, eval_iter=5, initial_eval=True):
    """The chapter's run; returns {"lines": printed chapter lines, "model": the trained model,
    "logits_of": its classification forward, "covered": train indices the final pass read,
    "max_length": the padding length}. `weights`: a Hugging Face folder, or a GPTConfig for
    random weights drawn right after seeding."""
    lines = []
    device = torch.device("cpu")
    logits_of = select(position, average)

    def calc_loss_batch(input_batch, target_batch, model):
        logits = logits_of(model, input_batch.to(device))
        return F.cross_entropy(logits, target_batch.to(device), ignore_index=ignore_index)

    def calc_loss_loader(data_loader, model, num_batches=None):
        total_loss = 0.
        if len(data_loader) == 0:
            return float("nan")
        num_batches = len(data_loader) if num_batches is None else \
            min(num_batches, len(data_loader))
        for i, (input_batch, target_batch) in enumerate(data_loader):
            if i < num_batches:
                total_loss += calc_loss_batch(input_batch, target_batch, model).item()
            else:
                break
        return total_loss / num_batches

    def calc_accuracy_loader(data_loader, model, num_batches=None):
        model.eval()
        correct_predictions, num_examples = 0, 0
        num_batches = len(data_loader) if num_batches is None else \
            min(num_batches, len(data_loader))
        for i, (input_batch, target_batch) in enumerate(data_loader):
            if i < num_batches:
                with torch.no_grad():
                    logits = logits_of(model, input_batch.to(device))
                predicted_labels = torch.argmax(logits, dim=-1)
                num_examples += predicted_labels.shape[0]
                correct_predictions += (predicted_labels == target_batch.to(device)).sum().item()
            else:
                break
        return correct_predictions / num_examples

    def evaluate_model(model, train_loader, val_loader):
        model.eval()
        with torch.no_grad():
            train_loss = calc_loss_loader(train_loader, model, num_batches=eval_iter)
            val_loss = calc_loss_loader(val_loader, model, num_batches=eval_iter)
        model.train()
        return train_loss, val_loss

    # 6.3: the datasets (padded to the longest training text unless told) and loaders
    splits = data.make_splits(data.load_rows(raw_path))
    tokenizer = data.get_tokenizer()
    train_ds = data.SpamDataset(splits["train"], tokenizer, context_length, pad=pad)
    val_ds = data.SpamDataset(splits["validation"], tokenizer, train_ds.max_length, pad=pad)
    test_ds = data.SpamDataset(splits["test"], tokenizer, train_ds.max_length, pad=pad)
    recording = Recording(train_ds)
    torch.manual_seed(seed)
    train_loader = DataLoader(recording, batch_size=batch_size, shuffle=True, num_workers=0,
                              drop_last=True)
    val_loader = DataLoader(val_ds, batch_size=batch_size, shuffle=False, drop_last=False)
    test_loader = DataLoader(test_ds, batch_size=batch_size, shuffle=False, drop_last=False)

    # 6.4: the model (the chapter's explicit formulas); random weights right after seeding
    if isinstance(weights, gpt.GPTConfig):
        torch.manual_seed(seed)
        model = gpt.GPTModel(weights, plain=True)
    else:
        model = gpt.load_gpt(weights, plain=True)
    if not causal:  # experiment 17: no position is hidden from any other
        for block in model.trf_blocks:
            block.att.mask.fill_(False)
    model.eval()

    # 6.5: freeze, a new head drawn right after seeding, unfreeze
    for param in model.parameters():
        param.requires_grad = False
    torch.manual_seed(seed)
    model.out_head = torch.nn.Linear(in_features=model.cfg.emb_dim, out_features=2)
    if trainable == "lora":
        for param in model.parameters():
            param.requires_grad = False
        replace_linear_with_lora(model, lora_rank, lora_alpha)
    else:
        unfrozen = {"last_layer": [model.out_head],
                    "last_block": [model.out_head, model.trf_blocks[-1], model.final_norm],
                    "last_two_blocks": [model.out_head, *model.trf_blocks[-2:],
                                        model.final_norm],
                    "all": [model]}[trainable]
        for module in unfrozen:
            for param in module.parameters():
                param.requires_grad = True
    model.to(device)

    # 6.6: the look before training
    if initial_eval:
        torch.manual_seed(seed)
        accs = [calc_accuracy_loader(loader, model, num_batches=10)
                for loader in (train_loader, val_loader, test_loader)]
        with torch.no_grad():
            losses = [calc_loss_loader(loader, model, num_batches=5)
                      for loader in (train_loader, val_loader, test_loader)]
        for name, acc in zip(("Training", "Validation", "Test"), accs):
            lines.append(f"{name} accuracy: {acc*100:.2f}%")
        for name, loss in zip(("Training", "Validation", "Test"), losses):
            lines.append(f"{name} loss: {loss:.3f}")

    # 6.7: train_classifier_simple (with the book's gradient accumulation, experiment 15)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    examples_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        model.train()
        optimizer.zero_grad()
        for batch_idx, (input_batch, target_batch) in enumerate(train_loader):
            loss = calc_loss_batch(input_batch, target_batch, model)
            loss = loss / accumulation_steps
            loss.backward()
            if (batch_idx + 1) % accumulation_steps == 0 or batch_idx + 1 == len(train_loader):
                optimizer.step()
                optimizer.zero_grad()
            examples_seen += input_batch.shape[0]
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader)
                lines.append(f"Ep {epoch+1} (Step {global_step:06d}): "
                             f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        train_accuracy = calc_accuracy_loader(train_loader, model, num_batches=eval_iter)
        val_accuracy = calc_accuracy_loader(val_loader, model, num_batches=eval_iter)
        lines.append(f"Training accuracy: {train_accuracy*100:.2f}% | "
                     f"Validation accuracy: {val_accuracy*100:.2f}%")

    # 6.8: the accuracy over the whole of each split (the training loader drops its last batch)
    recording.seen = []
    finals = [calc_accuracy_loader(loader, model)
              for loader in (train_loader, val_loader, test_loader)]
    for name, acc in zip(("Training", "Validation", "Test"), finals):
        lines.append(f"{name} accuracy: {acc*100:.2f}%")
    model.eval()
    return {"lines": lines, "model": model, "logits_of": logits_of,
            "covered": set(recording.seen), "max_length": train_ds.max_length,
            "datasets": {"train": train_ds, "validation": val_ds, "test": test_ds}}


def assert_same_log(got, expected):
    """Every line equal, except that a printed loss may differ by one in its last digit (float
    rounding: fused kernels, shortcuts); accuracies, counts and the order of lines must be
    identical."""
    assert len(got) == len(expected), (got, expected)
    number = re.compile(r"\d+\.\d+")
    for a, b in zip(got, expected):
        if a == b:
            continue
        assert "loss" in a.lower() and number.sub("#", a) == number.sub("#", b), (a, b)
        for x, y in zip(number.findall(a), number.findall(b)):
            assert abs(float(x) - float(y)) <= 0.001 + 1e-9, (a, b)
