//! `cargo xtask layout`: records which functions of the agent run, and writes the linker script
//! (`mesh-agent/layout.ld`) that places them ahead of the rest of the code in release builds.
//!
//! Why: the kernel maps an executable's code into a process 64 KiB at a time around each
//! fault (and reads it ahead further), so an agent whose start-up touches code in every part
//! of the binary has most of its 8 MiB of code resident although it runs about a third of
//! it. With what runs placed together, an idle agent maps about what it runs
//! (docs/benchmarks.md, change 11).
//!
//! How: a release build whose link also writes the linker's map (which input section of which
//! file every function came from); the quick benchmark's scenarios with both agents under
//! callgrind, which names every function that executed at least once, start-up included
//! (sampling profilers miss what runs once); then one linker-script rule per function. Rust
//! names are matched without their hash and C library functions by archive member, so the
//! file survives compiler and dependency updates; what no longer matches is simply not
//! placed, and the release build says how much of the file it found ([`check`]).

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _, SymbolKind};

use crate::{apt, bench, cmd, workspace};

/// The script, relative to the workspace root (mesh-agent's build script passes it to the
/// linker of release builds).
pub const SCRIPT: &str = "mesh-agent/layout.ld";
/// The output section the script puts the recorded functions in, ahead of `.text`.
const OUTPUT_SECTION: &str = ".text.layout";
/// Below this share of the script's functions found in a release build, the build warns that
/// the script is stale.
const STALE_BELOW_PERCENT: usize = 90;

pub fn run(root: &Path) -> Result<()> {
    if !cmd::is_root() {
        bail!(
            "recording the agents' code runs the benchmark's testbed, which needs root; re-run as root:\n    \
             sudo env \"PATH=$PATH\" cargo xtask layout"
        );
    }
    apt::ensure(&["valgrind"], "recording the agents' code")?;
    let dir = root.join("target/layout");
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let map_path = dir.join("mesh-agent.map");
    let built = workspace::build_with_link_map(root, &map_path)?;

    let wrapper: Vec<OsString> = [
        "valgrind".into(),
        "--tool=callgrind".into(),
        format!("--callgrind-out-file={}/callgrind.%p", dir.display()),
        // Function names are all that is needed: no per-instruction costs, no demangling
        // (the linker matches the symbols' own names), no variable debug info.
        "--dump-instr=no".into(),
        "--demangle=no".into(),
        "--read-var-info=no".into(),
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    cmd::say("running the quick benchmark's scenarios with both agents under callgrind (~4 min)");
    bench::exercise(root, &built, &wrapper, &dir)?;

    let mut executed = BTreeSet::new();
    for entry in fs::read_dir(&dir)? {
        let path = entry?.path();
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("callgrind."))
        {
            let profile = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            executed.extend(executed_functions(&String::from_utf8_lossy(&profile)));
        }
    }
    ensure!(
        !executed.is_empty(),
        "callgrind recorded no function in {}; the agents' logs are in {}/logs",
        dir.display(),
        dir.display()
    );
    let map = fs::read_to_string(&map_path)
        .with_context(|| format!("reading the link map {}", map_path.display()))?;
    let sections = input_sections(&map);
    let rules: BTreeSet<String> = executed
        .iter()
        .filter_map(|name| rule(name, sections.get(name.as_str())?))
        .collect();
    ensure!(
        !rules.is_empty(),
        "none of the {} functions callgrind recorded is in the link map {}",
        executed.len(),
        map_path.display()
    );
    let script = root.join(SCRIPT);
    fs::write(&script, render(&rules)).with_context(|| format!("writing {}", script.display()))?;
    cmd::say(format!(
        "{}: {} rules for the {} functions that ran; rebuild with `cargo xtask build --release`",
        script.display(),
        rules.len(),
        executed.len()
    ));
    Ok(())
}

/// The names of the functions a callgrind profile saw run (`fn=` and `cfn=` lines; with
/// compressed strings a name is given once, as `(id) name`, and later as `(id)` alone).
fn executed_functions(profile: &str) -> BTreeSet<String> {
    profile
        .lines()
        .filter_map(|line| line.strip_prefix("fn=").or(line.strip_prefix("cfn=")))
        .filter_map(|rest| match rest.strip_prefix('(') {
            Some(compressed) => compressed.split_once(") ").map(|(_, name)| name),
            None => Some(rest),
        })
        .map(|name| {
            // Callgrind marks recursion levels and cycles with a quote and a number.
            match name.rsplit_once('\'') {
                Some((base, level)) if level.bytes().all(|b| b.is_ascii_digit()) => base,
                _ => name,
            }
        })
        .filter(|name| !name.is_empty() && !name.starts_with("0x"))
        .map(str::to_owned)
        .collect()
}

/// Where a function came from: its input section and the file (an object, or `archive(member)`).
#[derive(Debug, PartialEq, Eq)]
struct InputSection {
    name: String,
    file: String,
}

/// Every code symbol of a link map (lld's or GNU ld's, written with `--no-demangle`) with the
/// input section that holds it.
fn input_sections(map: &str) -> HashMap<&str, InputSection> {
    let lld = map
        .lines()
        .next()
        .is_some_and(|header| header.split_whitespace().eq(LLD_MAP_HEADER));
    if lld {
        lld_input_sections(map)
    } else {
        gnu_input_sections(map)
    }
}

/// The first line of an lld map; the linker Rust uses by default on x86_64 Linux.
const LLD_MAP_HEADER: [&str; 7] = ["VMA", "LMA", "Size", "Align", "Out", "In", "Symbol"];

/// lld: four columns (VMA, LMA, size, alignment), then an output section, an input section
/// (`file:(section)`, 8 columns deeper) or a symbol (16 columns deeper).
fn lld_input_sections(map: &str) -> HashMap<&str, InputSection> {
    let mut symbols = HashMap::new();
    let mut current: Option<InputSection> = None;
    for line in map.lines().skip(1) {
        let Some((depth, entry)) = lld_entry(line) else {
            continue;
        };
        match depth {
            // An output section.
            0 => current = None,
            1 => {
                current = entry
                    .strip_suffix(')')
                    .and_then(|e| e.rsplit_once(":("))
                    .map(|(file, section)| InputSection {
                        // `.eh_frame+0x18`: a part of a merged section.
                        name: section.split('+').next().unwrap_or(section).to_string(),
                        file: file.to_string(),
                    })
            }
            _ => {
                if let Some(section) = &current
                    && section.name.starts_with(".text")
                    && !entry.contains(' ')
                {
                    symbols.entry(entry).or_insert_with(|| InputSection {
                        name: section.name.clone(),
                        file: section.file.clone(),
                    });
                }
            }
        }
    }
    symbols
}

/// The depth (0 output section, 1 input section, 2 symbol) and text of a line of an lld map.
fn lld_entry(line: &str) -> Option<(usize, &str)> {
    let mut rest = line;
    for _ in 0..4 {
        let trimmed = rest.trim_start();
        let end = trimmed.find(' ')?;
        if !trimmed[..end].bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        rest = &trimmed[end..];
    }
    let entry = rest.trim_start();
    let indent = rest.len() - entry.len();
    // One space separates the columns; the levels below an output section are indented by 8.
    let depth = match indent {
        0 => return None,
        1..=8 => 0,
        9..=16 => 1,
        _ => 2,
    };
    Some((depth, entry.trim_end()))
}

/// GNU ld: each input section as ` .name 0xaddr 0xsize file` (a long name on a line of its own,
/// the rest on the next) followed by its symbols, each as `0xaddr name` on a deeper-indented
/// line.
fn gnu_input_sections(map: &str) -> HashMap<&str, InputSection> {
    let mut symbols = HashMap::new();
    let body = map
        .split_once("Linker script and memory map")
        .map_or(map, |(_, body)| body);
    let mut current: Option<(String, Option<String>)> = None;
    for line in body.lines() {
        if !line.starts_with(' ') {
            // An output section (or a script statement): no input section is open.
            current = None;
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        if line.starts_with(" .") {
            current = match words.as_slice() {
                [name, addr, size, file @ ..]
                    if is_hex(addr) && is_hex(size) && !file.is_empty() =>
                {
                    Some((name.to_string(), Some(file.join(" "))))
                }
                [name] => Some((name.to_string(), None)),
                _ => None,
            };
            continue;
        }
        match (&mut current, words.as_slice()) {
            // The rest of an input section whose name had a line of its own.
            (Some((_, file @ None)), [addr, size, rest @ ..])
                if is_hex(addr) && is_hex(size) && !rest.is_empty() =>
            {
                *file = Some(rest.join(" "));
            }
            (Some((section, Some(file))), [addr, symbol])
                if is_hex(addr) && section.starts_with(".text") =>
            {
                symbols.entry(*symbol).or_insert_with(|| InputSection {
                    name: section.clone(),
                    file: file.clone(),
                });
            }
            _ => {}
        }
    }
    symbols
}

fn is_hex(word: &str) -> bool {
    word.strip_prefix("0x")
        .is_some_and(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The script rule that places `symbol` from `section`, written to keep matching after
/// rebuilds: a function in a section of its own (Rust code, C compiled with
/// `-ffunction-sections`) by its name without hashes, in either of the sections LLVM may put
/// it in; any other code (glibc, assembly) by its archive member, without versions and hashes.
fn rule(symbol: &str, section: &InputSection) -> Option<String> {
    let own_section = section
        .name
        .strip_suffix(symbol)
        .is_some_and(|prefix| prefix.starts_with(".text") && prefix.ends_with('.'));
    let rule = if own_section {
        let name = generic_symbol(symbol);
        format!("*(.text.{name} .text.unlikely.{name})")
    } else {
        format!("{}({})", generic_file(&section.file)?, section.name)
    };
    rule.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_.$*-:() +".contains(&b))
        .then_some(rule)
}

/// A symbol name with what changes between builds replaced by `*`: the hash at the end of a
/// legacy Rust name (`17h<16 hex digits>E`), the crate disambiguators of a v0 name (`Cs<base 62>_`).
fn generic_symbol(symbol: &str) -> String {
    if symbol.starts_with("_ZN") {
        if let Some(stem) = symbol.strip_suffix('E')
            && let Some((stem, hash)) = stem.rsplit_once("17h")
            && hash.len() == 16
            && hash.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return format!("{stem}17h*");
        }
        return symbol.to_string();
    }
    if !symbol.starts_with("_R") {
        return symbol.to_string();
    }
    let mut out = String::with_capacity(symbol.len());
    let mut rest = symbol;
    while let Some(at) = rest.find("Cs") {
        out.push_str(&rest[..at + 2]);
        rest = &rest[at + 2..];
        let digits = rest.bytes().take_while(u8::is_ascii_alphanumeric).count();
        if digits > 0 && rest[digits..].starts_with('_') {
            out.push('*');
            rest = &rest[digits..];
        }
    }
    out.push_str(rest);
    out
}

/// The file part of a rule: `*archive.a:member.o` or `*object.o`, with library versions
/// (`libm-2.36.a`), rlib hashes (`libring-<hex>.rlib`) and cc's object-name hashes
/// (`<16 hex>-aesni-gcm-x86_64-elf.o`) replaced by `*`. None for Rust's own objects, whose
/// functions all have sections of their own.
fn generic_file(file: &str) -> Option<String> {
    let (path, member) = match file.strip_suffix(')').and_then(|f| f.split_once('(')) {
        Some((archive, member)) => (archive, Some(member)),
        None => (file, None),
    };
    let base = path.rsplit('/').next().unwrap_or(path);
    if base.ends_with(".rcgu.o") {
        return None;
    }
    let base = without_version(base);
    Some(match member {
        Some(member) => {
            let member = match member.split_once('-') {
                Some((hash, rest))
                    if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) =>
                {
                    format!("*-{rest}")
                }
                _ => member.to_string(),
            };
            format!("*{base}:{member}")
        }
        None => format!("*{base}"),
    })
}

/// `libm-2.36.a` → `libm-*.a`, `libring-0123abcd.rlib` → `libring-*.rlib`.
fn without_version(base: &str) -> String {
    for extension in [".a", ".rlib"] {
        if let Some(stem) = base.strip_suffix(extension)
            && let Some((name, version)) = stem.rsplit_once('-')
            && !version.is_empty()
            && version.bytes().all(|b| b.is_ascii_hexdigit() || b == b'.')
        {
            return format!("{name}-*{extension}");
        }
    }
    base.to_string()
}

fn render(rules: &BTreeSet<String>) -> String {
    let mut script = String::from(
        "/* The code layout of mesh-agent's release builds: the functions an agent ran while\n \
         * `cargo xtask layout` exercised it (start-up, TLS handshakes, every kind of benchmark\n \
         * traffic), placed ahead of the rest of the code so that an idle agent maps little more\n \
         * than the code it runs (docs/benchmarks.md, change 11).\n \
         *\n \
         * Written by `sudo cargo xtask layout`; do not edit. Names are matched without their\n \
         * hashes, so after compiler or dependency updates the script still links and places\n \
         * fewer functions; `cargo xtask build --release` says how many it found and asks for a\n \
         * new recording when too few are.\n \
         */\n\
         SECTIONS\n{\n  .text.layout :\n  {\n",
    );
    for rule in rules {
        script.push_str("    ");
        script.push_str(rule);
        script.push('\n');
    }
    script.push_str("  }\n}\nINSERT BEFORE .text;\n");
    script
}

/// How much of a layout script a binary's link placed.
#[derive(Debug, PartialEq, Eq)]
struct Coverage {
    /// Function-name rules of the script with at least one function in [`OUTPUT_SECTION`].
    found: usize,
    /// Function-name rules of the script (its archive-member rules are not counted).
    named: usize,
    /// Size of [`OUTPUT_SECTION`].
    bytes: u64,
}

/// Says how much of `script` a release build of `bin` placed: fails if the script was not
/// applied at all, warns if it looks stale.
pub fn check(bin: &Path, executable: &[u8], script: &Path) -> Result<()> {
    let Some(Coverage {
        found,
        named,
        bytes,
    }) = coverage(bin, executable, script)?
    else {
        return Ok(());
    };
    let message = format!(
        "code layout: {found} of the {named} functions named in {} found, {} KiB placed first",
        script.display(),
        bytes / 1024
    );
    if found * 100 < named * STALE_BELOW_PERCENT {
        cmd::say(format!(
            "warning: {message}; the recording is stale and an idle agent maps more code than \
             it needs: record it again with `sudo cargo xtask layout` and commit {SCRIPT}"
        ));
    } else {
        cmd::say(message);
    }
    Ok(())
}

/// None when the script names no function.
fn coverage(bin: &Path, executable: &[u8], script: &Path) -> Result<Option<Coverage>> {
    let text =
        fs::read_to_string(script).with_context(|| format!("reading {}", script.display()))?;
    let patterns = symbol_patterns(&text);
    if patterns.is_empty() {
        return Ok(None);
    }
    let file = object::File::parse(executable)
        .with_context(|| format!("{} is not an object file", bin.display()))?;
    let Some(section) = file.section_by_name(OUTPUT_SECTION) else {
        bail!(
            "{} has no {OUTPUT_SECTION} section: the link did not apply {} (mesh-agent's build \
             script passes it to GNU ld or lld; another linker may ignore its INSERT command)",
            bin.display(),
            script.display()
        );
    };
    let (start, end) = (section.address(), section.address() + section.size());
    let mut placed: Vec<&str> = file
        .symbols()
        .filter(|s| s.kind() == SymbolKind::Text && (start..end).contains(&s.address()))
        .filter_map(|s| s.name().ok())
        .collect();
    placed.sort_unstable();
    let found = patterns
        .iter()
        .filter(|pattern| {
            // Every pattern starts with a literal part: only symbols with that prefix can match.
            let prefix = pattern.split('*').next().unwrap_or_default();
            let from = placed.partition_point(|s| *s < prefix);
            placed[from..]
                .iter()
                .take_while(|s| s.starts_with(prefix))
                .any(|s| glob_match(pattern, s))
        })
        .count();
    Ok(Some(Coverage {
        found,
        named: patterns.len(),
        bytes: section.size(),
    }))
}

/// The function-name patterns of a layout script (its archive-member rules are not counted).
fn symbol_patterns(script: &str) -> Vec<&str> {
    script
        .lines()
        .filter_map(|line| line.trim().strip_prefix("*(.text."))
        .filter_map(|rest| rest.split([' ', ')']).next())
        .collect()
}

/// Shell-style matching with `*` as the only wildcard, as the linker matches section names.
fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was, and how much of the text it has taken so far.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((star_pi, star_ti)) = star {
            pi = star_pi + 1;
            ti = star_ti + 1;
            star = Some((star_pi, star_ti + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::process::Command;

    fn at(name: &str, file: &str) -> InputSection {
        InputSection {
            name: name.into(),
            file: file.into(),
        }
    }

    #[test]
    fn callgrind_names_every_function_once() {
        let profile = "version: 1\ncreator: callgrind-3.19.0\n\
                       ob=(1) /x/mesh-agent\nfl=(1) ???\n\
                       fn=(1) _ZN4core3fmt5write17h0123456789abcdefE\n0 5\n\
                       cfn=(2) memcpy\ncalls=1 0\n0 3\n\
                       fn=(2)\n0 1\n\
                       fn=(3) _ZN3foo3bar17h0123456789abcdefE'2\n0 1\n\
                       fn=(4) 0x0000000000b97dd0\n0 1\n\
                       fn=plain_uncompressed\n0 1\n";
        let names: Vec<String> = executed_functions(profile).into_iter().collect();
        assert_eq!(
            names,
            [
                "_ZN3foo3bar17h0123456789abcdefE",
                "_ZN4core3fmt5write17h0123456789abcdefE",
                "memcpy",
                "plain_uncompressed",
            ]
        );
    }

    #[test]
    fn a_map_gives_each_function_its_input_section() {
        // Indentation is part of the format, so the excerpt starts at column 0.
        let map = r"Archive member included to satisfy reference by file (symbol)

Linker script and memory map

.text           0x00000000000091c0    0x7802f
 *(.text.unlikely .text.*_unlikely .text.unlikely.*)
 .text.unlikely
                0x00000000000091c0       0x2c /usr/lib/libc.a(abort.o)
 .text.very_long_function_name
                0x00000000000096d0        0x4 /tmp/cc1.o
                0x00000000000096d0                very_long_function_name
 *fill*         0x00000000000096d4        0xc 
 .text.f2       0x00000000000096e0        0x4 /tmp/cc1.o
                0x00000000000096e0                f2
 .text          0x00000000000096f0     0x2297 /usr/lib/libc.a(libc-start.o)
                0x000000000000a870                __libc_start_main_impl
                0x000000000000a870                PROVIDE (__etext = .)
.rodata         0x0000000000090000      0x100
 .rodata.str    0x0000000000090000       0x10 /tmp/cc1.o
                0x0000000000090000                a_string
";
        let sections = input_sections(map);
        assert_eq!(
            sections.get("very_long_function_name"),
            Some(&at(".text.very_long_function_name", "/tmp/cc1.o"))
        );
        assert_eq!(sections.get("f2"), Some(&at(".text.f2", "/tmp/cc1.o")));
        assert_eq!(
            sections.get("__libc_start_main_impl"),
            Some(&at(".text", "/usr/lib/libc.a(libc-start.o)"))
        );
        assert_eq!(sections.len(), 3, "{sections:?}");
    }

    #[test]
    fn an_lld_map_gives_each_function_its_input_section() {
        let map = r"             VMA              LMA     Size Align Out     In      Symbol
          18c0c0           18c0c0       5c     4         /usr/lib/libc.a(fileops.o):(.rodata)
          18c540           18c540       40     1                 nbits.1
          255780           255780   3e3616    64 .text.layout
          2661c0           2661c0       a5    16         /t/deps/mesh_agent-f1.mesh_agent.35-cgu.0.rcgu.o:(.text._ZN3foo3bar17h0123456789abcdefE)
          2661c0           2661c0       a5     1                 _ZN3foo3bar17h0123456789abcdefE
          638dc0           638dc0   456438    64 .text
          638dc0           638dc0     2297    16         /usr/lib/libc.a(libc-start.o):(.text)
          638dc0           638dc0        0     1                 __libc_start_main_impl
          639000           639000       10     8         /usr/lib/libc.a(fileops.o):(.eh_frame+0x18)
          639000           639000        0     1                 not_code
";
        let sections = input_sections(map);
        assert_eq!(
            sections.get("_ZN3foo3bar17h0123456789abcdefE"),
            Some(&at(
                ".text._ZN3foo3bar17h0123456789abcdefE",
                "/t/deps/mesh_agent-f1.mesh_agent.35-cgu.0.rcgu.o"
            ))
        );
        assert_eq!(
            sections.get("__libc_start_main_impl"),
            Some(&at(".text", "/usr/lib/libc.a(libc-start.o)"))
        );
        assert_eq!(sections.len(), 2, "{sections:?}");
    }

    #[test]
    fn rules_survive_rebuilds() {
        let rust = "/t/mesh_agent-1a2b.mesh_agent.3c4d-cgu.0.rcgu.o";
        let legacy = "_ZN4core3fmt5write17h0123456789abcdefE";
        let wanted = "*(.text._ZN4core3fmt5write17h* .text.unlikely._ZN4core3fmt5write17h*)";
        assert_eq!(
            rule(legacy, &at(&format!(".text.{legacy}"), rust)).unwrap(),
            wanted
        );
        assert_eq!(
            rule(legacy, &at(&format!(".text.unlikely.{legacy}"), rust)).unwrap(),
            wanted
        );
        assert_eq!(
            rule(
                "_RNvCsjrHSEGnQ3l9_3std4exit",
                &at(".text._RNvCsjrHSEGnQ3l9_3std4exit", rust)
            )
            .unwrap(),
            "*(.text._RNvCs*_3std4exit .text.unlikely._RNvCs*_3std4exit)"
        );
        assert_eq!(
            rule(
                "_IO_file_open",
                &at(".text", "/usr/lib/x86_64-linux-gnu/libc.a(fileops.o)")
            )
            .unwrap(),
            "*libc.a:fileops.o(.text)"
        );
        assert_eq!(
            rule(
                "__exp_fma",
                &at(
                    ".text.fma",
                    "/usr/lib/x86_64-linux-gnu/libm-2.36.a(e_exp.o)"
                )
            )
            .unwrap(),
            "*libm-*.a:e_exp.o(.text.fma)"
        );
        assert_eq!(
            rule(
                "aes_gcm_enc_update_vaes_avx2",
                &at(
                    ".text",
                    "/t/deps/libring-0123456789abcdef.rlib(4f701d2e06800872-aes-gcm-avx2-x86_64-elf.o)"
                )
            )
            .unwrap(),
            "*libring-*.rlib:*-aes-gcm-avx2-x86_64-elf.o(.text)"
        );
        assert_eq!(
            rule("_start", &at(".text", "/usr/lib/x86_64-linux-gnu/rcrt1.o")).unwrap(),
            "*rcrt1.o(.text)"
        );
        assert_eq!(rule("weird", &at(".text", rust)), None);
    }

    #[test]
    fn globs_match_as_the_linker_does() {
        assert!(glob_match("_ZN3foo17h*", "_ZN3foo17h0123456789abcdefE"));
        assert!(glob_match(
            "_RNvCs*_3std4exit",
            "_RNvCsjrHSEGnQ3l9_3std4exit"
        ));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("a*c", "abcbd"));
        assert!(!glob_match("ab", "abc"));
        assert!(!glob_match("abc", "ab"));
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-layout-{name}-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// The directory of the lld that rustc links with (`ld.lld` for `cc -fuse-ld=lld`), if
    /// this toolchain has one.
    fn rust_lld_dir() -> Option<PathBuf> {
        let sysroot = Command::new("rustc")
            .args(["--print", "sysroot"])
            .output()
            .ok()?;
        let sysroot = String::from_utf8(sysroot.stdout).ok()?;
        let triple = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
        let dir = Path::new(sysroot.trim()).join(format!("lib/rustlib/{triple}/bin/gcc-ld"));
        dir.join("ld.lld").is_file().then_some(dir)
    }

    /// A static-pie C program linked with a script that names two of its three functions (and
    /// one that no longer exists), by GNU ld and by rustc's lld: the two are placed first, the
    /// third is not, the map parser finds them, and the coverage counts two of three.
    #[test]
    fn the_script_places_what_it_names() {
        let dir = scratch("place");
        let source = dir.join("p.c");
        fs::write(
            &source,
            "__attribute__((noinline)) int ran_a(int x) { return x * 7 + 1; }\n\
             __attribute__((noinline)) int never_b(int x) { return x * 5 + 2; }\n\
             __attribute__((noinline)) int ran_c(int x) { return x * 3 + 3; }\n\
             int main(int c, char **v) { (void)v; return ran_a(c) + ran_c(c) + (c > 100 ? never_b(c) : 0); }\n",
        )
        .unwrap();
        let rules: BTreeSet<String> = ["ran_a", "ran_c", "gone"]
            .iter()
            .map(|f| {
                let section = InputSection {
                    name: format!(".text.{f}"),
                    file: "/tmp/ccXYZ.o".into(),
                };
                rule(f, &section).unwrap()
            })
            .collect();
        let script = dir.join("layout.ld");
        fs::write(&script, render(&rules)).unwrap();

        let mut linkers = vec![("bfd", None)];
        linkers.extend(rust_lld_dir().map(|d| ("lld", Some(d))));
        for (linker, lld_dir) in linkers {
            let (bin, map) = (dir.join(linker), dir.join(format!("{linker}.map")));
            let mut cc = Command::new("cc");
            if let Some(lld_dir) = lld_dir {
                cc.arg(format!("-B{}", lld_dir.display()))
                    .arg("-fuse-ld=lld");
            }
            let output = cc
                .args(["-O2", "-ffunction-sections", "-static-pie", "-o"])
                .arg(&bin)
                .arg(&source)
                .arg(format!("-Wl,-T,{}", script.display()))
                .arg(format!("-Wl,-Map={},--no-demangle", map.display()))
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "cc with {linker} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );

            let data = fs::read(&bin).unwrap();
            let file = object::File::parse(&*data).unwrap();
            let layout = file
                .section_by_name(OUTPUT_SECTION)
                .expect("no layout section");
            let range = layout.address()..layout.address() + layout.size();
            let placed = |name: &str| {
                let symbol = file.symbols().find(|s| s.name() == Ok(name)).unwrap();
                range.contains(&symbol.address())
            };
            assert!(
                placed("ran_a") && placed("ran_c") && !placed("never_b"),
                "{linker}"
            );

            let map = fs::read_to_string(&map).unwrap();
            let sections = input_sections(&map);
            assert_eq!(
                sections.get("ran_a").map(|s| s.name.as_str()),
                Some(".text.ran_a"),
                "{linker}"
            );
            assert!(
                sections
                    .get("__libc_start_main_impl")
                    .is_some_and(|s| s.file.ends_with("libc.a(libc-start.o)")),
                "{linker}: {:?}",
                sections.get("__libc_start_main_impl")
            );

            let coverage = coverage(&bin, &data, &script).unwrap().unwrap();
            assert_eq!((coverage.found, coverage.named), (2, 3), "{linker}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    /// The committed script links (its syntax, and INSERT with the default script) and places
    /// the C library's start-up code, which every program runs.
    #[test]
    fn the_committed_script_links() {
        let dir = scratch("committed");
        let source = dir.join("hello.c");
        fs::write(
            &source,
            "#include <stdio.h>\nint main(void) { puts(\"hi\"); return 0; }\n",
        )
        .unwrap();
        let script = crate::workspace_root().join(SCRIPT);
        let bin = dir.join("hello");
        let output = Command::new("cc")
            .args(["-O2", "-static-pie", "-o"])
            .arg(&bin)
            .arg(&source)
            .arg(format!("-Wl,-T,{}", script.display()))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "linking with {} failed: {}",
            script.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        let data = fs::read(&bin).unwrap();
        let file = object::File::parse(&*data).unwrap();
        assert!(file.section_by_name(OUTPUT_SECTION).is_some());
        fs::remove_dir_all(&dir).unwrap();
    }
}
