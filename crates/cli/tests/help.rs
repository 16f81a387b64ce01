//! The command line as users meet it: every subcommand answers `--help` and
//! `-h` with its usage, a mistyped option gets a suggestion, and
//! docs/cli.md carries exactly the help the binary prints.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use clap::CommandFactory;
use origin_policy_cli::args::Cli;
use std::path::Path;
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_origin-policy"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn subcommands() -> Vec<String> {
    Cli::command()
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .collect()
}

/// A subcommand's own subcommands (`certs init`, ...), without `help`.
fn nested(name: &str) -> Vec<String> {
    Cli::command()
        .find_subcommand(name)
        .map(|c| {
            c.get_subcommands()
                .map(|s| s.get_name().to_owned())
                .filter(|s| s != "help")
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_subcommand_prints_its_usage_on_help_and_h() {
    let names = subcommands();
    assert!(names.len() >= 7, "{names:?}");
    for name in &names {
        for flag in ["--help", "-h"] {
            let out = run(&[name, flag]);
            let stdout = text(&out.stdout);
            assert!(out.status.success(), "{name} {flag}: {}", text(&out.stderr));
            assert!(
                stdout.contains(&format!("Usage: origin-policy {name}")),
                "{name} {flag}: {stdout}"
            );
        }
    }
    let out = run(&["--version"]);
    assert_eq!(
        text(&out.stdout).trim(),
        format!("origin-policy {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn a_mistyped_option_or_command_gets_a_suggestion_and_exit_2() {
    let out = run(&["mirror", "static.example.com", "--sitemp", "/sitemap.xml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("a similar argument exists: '--sitemap'"),
        "{}",
        text(&out.stderr)
    );
    let out = run(&["chek"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("a similar subcommand exists: 'check'"));
}

#[test]
fn completions_name_every_subcommand() {
    let out = run(&["completions", "bash"]);
    assert!(out.status.success());
    let script = text(&out.stdout);
    for name in subcommands() {
        assert!(
            script.contains(&name),
            "{name} missing from the bash completions"
        );
    }
}

/// The generated part of docs/cli.md: the top-level help, then each
/// subcommand's.
fn help_section() -> String {
    let mut out = String::new();
    let mut block = |title: String, args: &[&str]| {
        let help = text(&run(args).stdout);
        out.push_str(&format!("### {title}\n\n```\n{}\n```\n\n", help.trim_end()));
    };
    block("`origin-policy --help`".to_owned(), &["--help"]);
    for name in subcommands().iter().filter(|n| *n != "help") {
        block(format!("`origin-policy {name} --help`"), &[name, "--help"]);
        for sub in nested(name) {
            block(
                format!("`origin-policy {name} {sub} --help`"),
                &[name, &sub, "--help"],
            );
        }
    }
    out
}

#[test]
fn docs_cli_md_has_the_help_the_binary_prints() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/cli.md");
    let doc = std::fs::read_to_string(&path).expect("docs/cli.md");
    let (begin, end) = ("<!-- help: begin -->\n", "<!-- help: end -->");
    let start = doc.find(begin).expect("the begin marker") + begin.len();
    let stop = doc.find(end).expect("the end marker");
    let expected = help_section();
    if std::env::var_os("UPDATE_CLI_DOCS").is_some() {
        let updated = format!("{}{expected}{}", &doc[..start], &doc[stop..]);
        std::fs::write(&path, updated).expect("docs/cli.md written");
        return;
    }
    assert!(
        doc[start..stop] == expected,
        "docs/cli.md differs from the binary's help: run \
         `UPDATE_CLI_DOCS=1 cargo test -p origin-policy-cli --test help`"
    );
}
