//! Man pages and shell completions generated from the clap definitions, so they never
//! disagree with `--help`. Both binaries expose this as the hidden `generate-docs --out DIR`;
//! the packaging steps in docs/boot.md install what it writes.

use std::io;
use std::path::{Path, PathBuf};

use clap_complete::Shell;

/// Writes, under `out`: `man/man<section>/<name>.<section>` and one page per visible
/// subcommand (`<name>-<sub>.<section>`), and completions for bash
/// (`completions/bash/<name>`), zsh (`completions/zsh/_<name>`) and fish
/// (`completions/fish/<name>.fish`). Returns the files written.
pub fn generate(cmd: clap::Command, section: &str, out: &Path) -> io::Result<Vec<PathBuf>> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let name = cmd.get_name().to_string();
    let man_dir = out.join("man").join(format!("man{section}"));
    std::fs::create_dir_all(&man_dir)?;
    let mut written = Vec::new();
    man_pages(&cmd, section, &man_dir, &mut written)?;
    for (shell, dir, file) in [
        (Shell::Bash, "bash", name.clone()),
        (Shell::Zsh, "zsh", format!("_{name}")),
        (Shell::Fish, "fish", format!("{name}.fish")),
    ] {
        let dir = out.join("completions").join(dir);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(file);
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), &name, &mut script);
        if shell == Shell::Bash {
            script = fix_bash_names(&name, &script);
        }
        std::fs::write(&path, script)?;
        written.push(path);
    }
    Ok(written)
}

/// clap_complete 4.6 mangles a hyphenated binary name two ways in its bash script: the
/// subcommand dispatch uses `update__agent__subcmd__demo`, the option tables
/// `update__subcmd__agent__subcmd__demo`, so no subcommand's options ever complete. Use the
/// dispatch's spelling everywhere (agent/tests/man_pages.rs completes `demo --la`).
fn fix_bash_names(name: &str, script: &[u8]) -> Vec<u8> {
    let wrong = name.replace('-', "__subcmd__");
    let right = name.replace('-', "__");
    String::from_utf8_lossy(script)
        .replace(&wrong, &right)
        .into_bytes()
}

fn man_pages(
    cmd: &clap::Command,
    section: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        man_pages(sub, section, dir, written)?;
    }
    let man = clap_mangen::Man::new(cmd.clone())
        .section(section)
        .manual("update-agent");
    written.push(man.generate_to(dir)?);
    Ok(())
}
