//! Writes the man pages, generated from the clap definitions in `spike::cli`, into DIR
//! (default `man/`): `spike.1` and one page per visible subcommand path (`spike-secret-put.1`, ...).
//!
//!     cargo run --locked --example manpages -- man
//!
//! `tests/packaging.rs` compiles this file into the test and checks that the committed `man/`
//! is exactly what it writes. The output depends only on the definitions and the crate
//! version: no date, no host details.

use std::io;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use spike::entry::cli::Cli;

#[allow(dead_code)] // not called when the test includes this file as a module
fn main() -> io::Result<()> {
    let dir = std::env::args_os()
        .nth(1)
        .map_or_else(|| PathBuf::from("man"), PathBuf::from);
    let pages = man_pages(&dir)?;
    eprintln!("wrote {} man pages to {}", pages.len(), dir.display());
    Ok(())
}

/// Writes every page into `dir`, creating it if needed, and returns the files written, sorted.
pub fn man_pages(dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = Cli::command().disable_help_subcommand(true);
    // Building assigns each subcommand its display name (`spike-secret-put`) and bin name
    // (`spike secret put`), which become the page's title, file name and synopsis.
    cmd.build();
    let source = format!("spike {}", env!("CARGO_PKG_VERSION"));
    let mut written = Vec::new();
    write_pages(&cmd, dir, &source, &mut written)?;
    written.sort();
    Ok(written)
}

fn write_pages(
    cmd: &clap::Command,
    dir: &Path,
    source: &str,
    written: &mut Vec<PathBuf>,
) -> io::Result<()> {
    let man = clap_mangen::Man::new(cmd.clone());
    let mut page = Vec::new();
    man.render(&mut page)?;
    let page = String::from_utf8(page).map_err(io::Error::other)?;
    let path = dir.join(man.get_filename());
    std::fs::write(&path, with_title_line(&page, &man.get_filename(), source))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, dir, source, written)?;
    }
    Ok(())
}

/// Replaces clap_mangen's `.TH` line with one whose empty date is quoted: clap_mangen writes an
/// empty date as nothing, which shifts the source into the date's place and the manual name into
/// the source's. `.TH title section date source manual`; we want no date, so output depends
/// only on the definitions.
fn with_title_line(page: &str, file_name: &str, source: &str) -> String {
    let (title, section) = file_name.rsplit_once('.').unwrap_or((file_name, "1"));
    let title_line = format!(".TH {title} {section} \"\" \"{source}\" \"spike manual\"");
    page.lines()
        .map(|line| {
            if line.starts_with(".TH ") {
                title_line.as_str()
            } else {
                line
            }
        })
        .flat_map(|line| [line, "\n"])
        .collect()
}
