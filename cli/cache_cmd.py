"""`mlx-internvl cache list|delete`: a thin shell over `mlx_internvl.cache`."""

import click
from huggingface_hub import constants

from mlx_internvl import cache
from mlx_internvl.errors import UserError


def _table(rows, headers):
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = "  ".join(f"{{:{w}}}" for w in widths)
    return "\n".join([line.format(*headers), line.format(*["-" * w for w in widths])]
                     + [line.format(*map(str, r)) for r in rows])


@click.group(name="cache")
def command():
    """Show and clean the converted-model cache and the Hugging Face downloads behind it."""


@command.command(name="list")
@click.option("--pattern", default="internvl", show_default=True,
              help="Downloads listed: hub repos whose id contains this (and every repo that has a conversion).")
@click.option("--all", "show_all", is_flag=True, help="List every model repo in the Hugging Face cache.")
def list_cmd(pattern, show_all):
    """List converted models (with sizes) and the hub downloads they came from."""
    conv = cache.conversions()
    click.echo(f"Converted models in {cache.cache_root() / 'models'}:")
    if conv:
        click.echo(_table([(c.repo_id, c.revision[:12], cache.human_size(c.size), cache.age(c.modified), c.path)
                           for c in conv], ["repo", "revision", "size", "converted", "path"]))
        click.echo(f"{len(conv)} conversion(s), {cache.human_size(sum(c.size for c in conv))} in all")
    else:
        click.echo("(none)")
    repos = cache.downloads(None if show_all else pattern)
    click.echo(f"\nHugging Face downloads in {constants.HF_HUB_CACHE}"
               + (" (HF_HUB_OFFLINE is on: nothing will be downloaded)" if cache.hub_offline() else "") + ":")
    if repos:
        click.echo(_table([(r.repo_id, len(r.revisions), r.size_on_disk_str, cache.age(r.last_modified))
                           for r in repos], ["repo", "revisions", "size", "modified"]))
    else:
        click.echo("(none)")


@command.command(name="delete")
@click.argument("repo_id")
@click.option("--revision", default=None, help="Only the conversion (and download) of this commit (or prefix).")
@click.option("--downloads", "with_downloads", is_flag=True,
              help="Also delete the repo's downloads from the Hugging Face cache (huggingface-hub's delete).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def delete_cmd(repo_id, revision, with_downloads, yes):
    """Delete REPO_ID's converted models (and with --downloads its Hugging Face downloads)."""
    conv = [c for c in cache.conversions(repo_id) if revision is None or c.revision.startswith(revision)]
    revs = [rev for r in cache.downloads(None, repo_id) for rev in r.revisions
            if revision is None or rev.commit_hash.startswith(revision)] if with_downloads else []
    if not conv and not revs:
        raise UserError(f"nothing cached for {repo_id}" + (f" at revision {revision}" if revision else "")
                        + "; see `mlx-internvl cache list`")
    for c in conv:
        click.echo(f"conversion {c.repo_id}@{c.revision[:12]}  {cache.human_size(c.size)}  {c.path}")
    for rev in revs:
        click.echo(f"download   {repo_id}@{rev.commit_hash[:12]}  {rev.size_on_disk_str}")
    if not yes and not click.confirm("Delete these?", default=False, err=True):
        raise click.Abort()
    freed = sum(c.size for c in cache.delete_conversions(repo_id, revision))
    msg = f"Deleted {len(conv)} conversion(s) ({cache.human_size(freed)})"
    if with_downloads:
        strategy = cache.delete_downloads(repo_id, revision)
        if strategy is not None:
            msg += f" and {len(revs)} download revision(s) ({strategy.expected_freed_size_str})"
    click.echo(msg)
