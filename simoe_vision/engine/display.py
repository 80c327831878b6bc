"""What a user sees: one live table that grows by a row per epoch, with the running pass's progress bar under it,
and a table of the final results."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional

from rich.console import Console, Group, RenderableType
from rich.live import Live
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
    """Progress bars and tables on rank 0; every method is a no-op when ``enabled`` is false (other ranks).

    On a terminal the epoch table is live: each epoch adds a row to the same table, and the running pass's progress
    bar sits under it. In logs and pipes (no terminal) the table's header is printed once and then one line per epoch,
    so a log reads as one table too. :meth:`close` ends the live display (the table stays on screen).
    """

    def __init__(self, enabled: bool = True, progress: bool = True, console: Optional[Console] = None) -> None:
        self.enabled = enabled
        self.show_progress = enabled and progress
        self.console = console or make_console()
        self._rows: List[Dict[str, Any]] = []
        self._total_epochs = 0
        self._bar: Optional[Progress] = None
        self._live: Optional[Live] = None

    def _renderable(self) -> RenderableType:
        parts: List[RenderableType] = [self._table()] if self._rows else []
        return Group(*parts, *([self._bar] if self._bar is not None else []))

    def _table(self) -> Table:
        table = Table(title=f'epochs ({len(self._rows)}/{self._total_epochs})', title_justify='left')
        for _, title, _ in EPOCH_COLUMNS:
            table.add_column(title, justify='right')
        for row in self._rows:
            table.add_row(*[_fmt(fmt, row.get(key)) for key, _, fmt in EPOCH_COLUMNS])
        return table

    def _live_display(self) -> Optional[Live]:
        """The live region on a terminal (started on first use); None in logs and pipes."""
        if self._live is None and self.console.is_terminal:
            self._live = Live(get_renderable=self._renderable, console=self.console, refresh_per_second=4)
            self._live.start()
        return self._live

    def close(self) -> None:
        """Stop the live display, leaving its last frame (the epoch table) on screen."""
        if self._live is not None:
            self._bar = None
            self._live.refresh()
            self._live.stop()
            self._live = None

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.enabled:
            self.console.print(*args, **kwargs)

    def track(self, iterable: Iterable, total: int, description: str) -> Iterable:
        """Iterate ``iterable`` under a progress bar; ``set_postfix(text)`` on the returned object updates it."""
        if not self.show_progress:
            yield from iterable
            return
        live = self._live_display()
        if live is None:  # logs and pipes: a bar would only print at its end; the epoch line follows anyway
            yield from iterable
            return
        progress = Progress(TextColumn('[bold]{task.description}'), BarColumn(), MofNCompleteColumn(),
                            TextColumn('{task.fields[postfix]}'), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=self.console)
        task = progress.add_task(description, total=total, postfix='')
        self._postfix = lambda text: progress.update(task, postfix=text)
        self._bar = progress
        try:
            for item in iterable:
                yield item
                progress.advance(task)
        finally:
            self._bar = None
            self._postfix = None

    def postfix(self, text: str) -> None:
        if self.show_progress and getattr(self, '_postfix', None) is not None:
            self._postfix(text)

    def epoch_table(self, row: Dict[str, Any], total_epochs: int) -> None:
        """Add the epoch's row: to the live table on a terminal, as one more line of the logged table otherwise."""
        if not self.enabled:
            return
        self._rows.append(row)
        self._total_epochs = total_epochs
        if self._live_display() is not None:
            self._live.refresh()
            return
        if len(self._rows) == 1:
            self._log_line([title for _, title, _ in EPOCH_COLUMNS])
        self._log_line([_fmt(fmt, row.get(key)) for key, _, fmt in EPOCH_COLUMNS])

    def _log_line(self, cells: List[str]) -> None:
        """One line of the logged epoch table: cells right-aligned in fixed columns, so the lines stack up."""
        widths = [max(len(title), 8) for _, title, _ in EPOCH_COLUMNS]
        self.console.print('  '.join(c.rjust(w) for c, w in zip(cells, widths, strict=True)), markup=False,
                           highlight=False, soft_wrap=True)

    def results_table(self, results: Dict[str, Any], run_dir: str) -> None:
        if not self.enabled:
            return
        self.close()
        table = Table(title='results', title_justify='left')
        table.add_column('metric')
        table.add_column('value', justify='right')
        for key, value in results.items():
            table.add_row(key, f'{value:.4f}' if isinstance(value, float) else str(value))
        self.console.print(table)
        self.console.print(f'run folder: [bold]{run_dir}[/bold]')
