"""What a user sees: rich progress bars for train/eval passes and a table per epoch and for the final results."""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

__all__ = ['EPOCH_COLUMNS', 'Display', 'make_console']

# (metrics key, column title, format) of the per-epoch table
EPOCH_COLUMNS = (
    ('epoch', 'epoch', '{}'),
    ('train_loss', 'train loss', '{:.4f}'),
    ('aux_loss', 'aux loss', '{:.4f}'),
    ('val_top1', 'val top-1', '{:.2f}'),
    ('val_top5', 'val top-5', '{:.2f}'),
    ('load_cv', 'load CV', '{:.3f}'),
    ('dropped', 'dropped', '{:.3f}'),
    ('entropy', 'entropy', '{:.3f}'),
    ('fluctuation', 'fluct.', '{:.4f}'),
    ('lr', 'lr', '{:.2e}'),
    ('epoch_time', 'time s', '{:.1f}'),
)


def _fmt(fmt: str, value: Any) -> str:
    if value is None or value == '':
        return '-'
    return fmt.format(value)


def make_console() -> Console:
    """A rich console; in logs and pipes 160 columns wide, so tables are not cut to rich's default of 80."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


class Display:
    """Progress bars and tables on rank 0; every method is a no-op when ``enabled`` is false (other ranks)."""

    def __init__(self, enabled: bool = True, progress: bool = True, console: Optional[Console] = None) -> None:
        self.enabled = enabled
        self.show_progress = enabled and progress
        self.console = console or make_console()

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.enabled:
            self.console.print(*args, **kwargs)

    def track(self, iterable: Iterable, total: int, description: str) -> Iterable:
        """Iterate ``iterable`` under a progress bar; ``set_postfix(text)`` on the returned object updates it."""
        if not self.show_progress:
            yield from iterable
            return
        progress = Progress(TextColumn('[bold]{task.description}'), BarColumn(), MofNCompleteColumn(),
                            TextColumn('{task.fields[postfix]}'), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=self.console, transient=True)
        with progress:
            task = progress.add_task(description, total=total, postfix='')
            self._postfix = lambda text: progress.update(task, postfix=text)
            for item in iterable:
                yield item
                progress.advance(task)
        self._postfix = None

    def postfix(self, text: str) -> None:
        if self.show_progress and getattr(self, '_postfix', None) is not None:
            self._postfix(text)

    def epoch_table(self, row: Dict[str, Any], total_epochs: int) -> None:
        if not self.enabled:
            return
        table = Table(title=f'epoch {row["epoch"]}/{total_epochs}', title_justify='left')
        for _, title, _ in EPOCH_COLUMNS:
            table.add_column(title, justify='right')
        table.add_row(*[_fmt(fmt, row.get(key)) for key, _, fmt in EPOCH_COLUMNS])
        self.console.print(table)

    def results_table(self, results: Dict[str, Any], run_dir: str) -> None:
        if not self.enabled:
            return
        table = Table(title='results', title_justify='left')
        table.add_column('metric')
        table.add_column('value', justify='right')
        for key, value in results.items():
            table.add_row(key, f'{value:.4f}' if isinstance(value, float) else str(value))
        self.console.print(table)
        self.console.print(f'run folder: [bold]{run_dir}[/bold]')
