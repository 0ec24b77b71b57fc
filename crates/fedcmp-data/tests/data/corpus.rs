//! Corpus readers on fixtures the tests write themselves: LLaVA JSON, JSONL
//! and CSV manifests with every kind of bad record (exact skip counts, file
//! and 1-based line of each), whole-file errors, the TOML form of source
//! specs, `limit` and determinism, image loading, and the offline readers on
//! tiny fake asset caches laid out like the real one. Tests marked ignored
//! read the real cached assets (`fedcmp assets fetch` first).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use fedcmp_data::corpus::{self, load_image, load_source, offline, SourceEnv, SourceSpec};
use fedcmp_data::record::{Corpus, ImageSource, RawImage, SkipKind};

/// A tiny valid PNG.
fn write_png(path: &Path, shade: u8) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    image::RgbImage::from_pixel(6, 4, image::Rgb([shade, 0, 255 - shade])).save(path)?;
    Ok(())
}

/// A PNG cut off halfway through its data, as an interrupted download
/// leaves it.
fn write_truncated_png(path: &Path) -> anyhow::Result<()> {
    let mut bytes = Vec::new();
    let img = image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([x as u8 * 7, y as u8 * 7, 3]));
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )?;
    std::fs::write(path, &bytes[..bytes.len() / 2])?;
    Ok(())
}

fn spec(toml_text: &str) -> anyhow::Result<SourceSpec> {
    Ok(toml::from_str(toml_text)?)
}

fn env(dir: &Path) -> SourceEnv {
    SourceEnv::new(dir.join("cache")).with_base_dir(dir)
}

/// (kind, line) of every kept example, sorted by line.
fn examples(c: &Corpus) -> Vec<(SkipKind, Option<usize>)> {
    let mut v: Vec<_> = c
        .skipped
        .examples()
        .iter()
        .map(|e| (e.kind, e.line))
        .collect();
    v.sort_by_key(|&(_, line)| line);
    v
}

fn ids(c: &Corpus) -> Vec<&str> {
    c.records.iter().map(|r| r.id.as_str()).collect()
}

fn llava_entry(id: &str, image: &str, human: &str, gpt: &str) -> String {
    format!(
        r#"{{"id": "{id}", "image": "{image}", "conversations": [{{"from": "human", "value": "{human}"}}, {{"from": "gpt", "value": "{gpt}"}}]}}"#
    )
}

/// The LLaVA fixture: one entry per line after the opening `[`, so entry n
/// is on line n + 1.
fn write_llava_fixture(dir: &Path) -> anyhow::Result<PathBuf> {
    let images = dir.join("images");
    write_png(&images.join("a.png"), 10)?;
    write_png(&images.join("b.png"), 20)?;
    write_png(&images.join("c.png"), 30)?;
    write_truncated_png(&images.join("trunc.png"))?;
    let ask = "Describe the image briefly.\\n<image>";
    let entries = [
        llava_entry("a", "a.png", ask, "A red square."),
        llava_entry("b", "b.png", ask, " A blue square. "),
        // 3: no <image> in the human turn.
        llava_entry("noimg", "c.png", "Describe the image briefly.", "text"),
        // 4: empty caption.
        llava_entry("empty", "c.png", ask, "   "),
        // 5: the image does not exist.
        llava_entry("missing", "nope.png", ask, "Gone."),
        // 6: truncated PNG: kept unless images are verified.
        llava_entry("trunc", "trunc.png", ask, "Half an image."),
        // 7: numeric id.
        r#"{"id": 42, "image": "c.png", "model": "x", "conversations": [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A third square."}]}"#.to_string(),
        // 8: duplicate id.
        llava_entry("a", "c.png", ask, "Again."),
        // 9: image is not a string.
        r#"{"id": "nine", "image": 5, "conversations": []}"#.to_string(),
        // 10: not an object.
        r#""just a string""#.to_string(),
        // 11: text-only entry.
        r#"{"id": "text", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}"#.to_string(),
    ];
    let path = dir.join("pretrain.json");
    std::fs::write(&path, format!("[\n{}\n]\n", entries.join(",\n")))?;
    Ok(path)
}

#[test]
fn llava_json_skips_bad_entries_and_counts_them_exactly() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = write_llava_fixture(dir.path())?;
    let s = spec(
        r#"kind = "llava-json"
path = "pretrain.json"
image-root = "images""#,
    )?;
    let c = load_source(&s, &env(dir.path()))?;

    assert_eq!(
        ids(&c),
        ["pretrain/a", "pretrain/b", "pretrain/trunc", "pretrain/42"]
    );
    let first = &c.records[0];
    assert_eq!(first.caption, "A red square.");
    assert_eq!(first.source, "pretrain");
    assert_eq!(first.label, None);
    assert_eq!(
        first.image,
        ImageSource::File(dir.path().join("images").join("a.png"))
    );
    assert_eq!(
        c.records[1].caption, "A blue square.",
        "captions are trimmed"
    );

    let sk = &c.skipped;
    assert_eq!(sk.count(SkipKind::MalformedRecord), 5);
    assert_eq!(sk.count(SkipKind::EmptyCaption), 1);
    assert_eq!(sk.count(SkipKind::MissingImage), 1);
    assert_eq!(sk.count(SkipKind::UndecodableImage), 0);
    assert_eq!(sk.total(), 7);
    assert_eq!(
        examples(&c),
        [
            (SkipKind::MalformedRecord, Some(4)),
            (SkipKind::EmptyCaption, Some(5)),
            (SkipKind::MissingImage, Some(6)),
            (SkipKind::MalformedRecord, Some(9)),
            (SkipKind::MalformedRecord, Some(10)),
            (SkipKind::MalformedRecord, Some(11)),
            (SkipKind::MalformedRecord, Some(12)),
        ]
    );
    assert!(sk.examples().iter().all(|e| e.file == path));
    let msg = |line| {
        sk.examples()
            .iter()
            .find(|e| e.line == Some(line))
            .map(|e| e.message.clone())
            .unwrap_or_default()
    };
    assert!(
        msg(4).contains("entry 3") && msg(4).contains("<image>"),
        "{}",
        msg(4)
    );
    assert!(msg(6).contains("nope.png"), "{}", msg(6));
    assert!(msg(9).contains("duplicate id"), "{}", msg(9));
    assert!(msg(12).contains("text-only"), "{}", msg(12));

    // The truncated PNG passed the cheap existence check; decoding it, as
    // the feature cache will, classifies it as undecodable.
    let trunc = &c.records[2];
    let err = load_image(&trunc.image)
        .err()
        .context("truncated PNG decoded")?;
    assert_eq!(err.kind, SkipKind::UndecodableImage);
    assert!(err.message.contains("trunc.png"), "{}", err.message);
    let good = load_image(&first.image).map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!((good.width(), good.height()), (6, 4));

    // With `verify-images`, the reader decodes and skips it itself.
    let s = spec(
        r#"kind = "llava-json"
path = "pretrain.json"
image-root = "images"
verify-images = true"#,
    )?;
    let c = load_source(&s, &env(dir.path()))?;
    assert_eq!(ids(&c), ["pretrain/a", "pretrain/b", "pretrain/42"]);
    assert_eq!(c.skipped.count(SkipKind::UndecodableImage), 1);
    assert_eq!(c.skipped.count(SkipKind::MissingImage), 1);
    assert_eq!(c.skipped.count(SkipKind::MalformedRecord), 5);
    assert_eq!(c.skipped.total(), 8);
    let undecodable = c
        .skipped
        .examples()
        .iter()
        .find(|e| e.kind == SkipKind::UndecodableImage)
        .context("no example")?;
    assert_eq!(undecodable.line, Some(7));
    Ok(())
}

#[test]
fn llava_images_default_to_the_json_files_folder() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    write_png(&dir.path().join("x").join("a.png"), 1)?;
    let path = dir.path().join("x").join("one.json");
    let entry = llava_entry("a", "a.png", "<image>", "One.");
    // A single-line file: every entry is on line 1.
    std::fs::write(&path, format!("\u{feff}[{entry}, {entry}]"))?;
    let s = spec("kind = \"llava-json\"\npath = \"x/one.json\"\nname = \"blip\"")?;
    let c = load_source(&s, &env(dir.path()))?;
    assert_eq!(ids(&c), ["blip/a"]);
    assert_eq!(c.records[0].source, "blip");
    assert_eq!(examples(&c), [(SkipKind::MalformedRecord, Some(1))]);
    assert!(c.skipped.examples()[0].message.contains("entry 2"));
    Ok(())
}

#[test]
fn jsonl_manifest_skips_bad_lines_with_their_line_numbers() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    write_png(&dir.path().join("a.png"), 1)?;
    write_png(&dir.path().join("b.png"), 2)?;
    let lines = [
        r#"{"image": "a.png", "caption": "First.", "label": "dog"}"#,
        r#"{"image": "b.png", "caption": "Second.", "label": "cat", "source": "pets", "extra": [1, 2]}"#,
        "",
        r#"{"image": "a.png", "caption": "broken"#,
        r#"{"image": "missing.png", "caption": "Gone."}"#,
        r#"{"image": "b.png", "caption": "  "}"#,
        r#"{"image": "b.png"}"#,
        r#"{"image": "https://example.com/c.png", "caption": "A URL."}"#,
        r#"{"image": "b.png", "caption": "Third.", "label": "cat", "id": "x9"}"#,
        r#"[1, 2]"#,
        "   ",
    ];
    let path = dir.path().join("manifest.jsonl");
    // Windows line ends and a byte-order mark are fine.
    std::fs::write(&path, format!("\u{feff}{}", lines.join("\r\n")))?;
    let c = load_source(
        &spec("kind = \"jsonl\"\npath = \"manifest.jsonl\"")?,
        &env(dir.path()),
    )?;

    assert_eq!(ids(&c), ["manifest/1", "pets/2", "manifest/x9"]);
    assert_eq!(c.records[1].source, "pets");
    // Names sorted per source: manifest {cat, dog}, pets {cat}.
    let labels: Vec<_> = c.records.iter().map(|r| r.label).collect();
    assert_eq!(labels, [Some(1), Some(0), Some(0)]);
    assert_eq!(c.label_names["manifest"], ["cat", "dog"]);
    assert_eq!(c.label_names["pets"], ["cat"]);

    let sk = &c.skipped;
    assert_eq!(sk.count(SkipKind::MalformedRecord), 4);
    assert_eq!(sk.count(SkipKind::MissingImage), 1);
    assert_eq!(sk.count(SkipKind::EmptyCaption), 1);
    assert_eq!(sk.count(SkipKind::UndecodableImage), 0);
    assert_eq!(sk.total(), 6);
    assert_eq!(
        examples(&c),
        [
            (SkipKind::MalformedRecord, Some(4)),
            (SkipKind::MissingImage, Some(5)),
            (SkipKind::EmptyCaption, Some(6)),
            (SkipKind::MalformedRecord, Some(7)),
            (SkipKind::MalformedRecord, Some(8)),
            (SkipKind::MalformedRecord, Some(10)),
        ]
    );
    assert!(sk.examples().iter().all(|e| e.file == path));
    let url = &sk
        .examples()
        .iter()
        .find(|e| e.line == Some(8))
        .context("line 8")?
        .message;
    assert!(url.contains("URL"), "{url}");
    Ok(())
}

/// A manifest from someone else must not make a run read files outside its
/// image root: `..`, absolute paths and symlinks that leave it are counted
/// skips (never opened), unless the source allows it; symlinks that stay
/// inside and `..` that comes back inside are fine.
#[test]
fn image_paths_outside_the_root_are_skipped_unless_allowed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    write_png(&data.join("images/a.png"), 1)?;
    write_png(&dir.path().join("secret.png"), 2)?;
    let secret = dir.path().join("secret.png");
    std::os::unix::fs::symlink(&secret, data.join("images/escape.png"))?;
    std::os::unix::fs::symlink(data.join("images/a.png"), data.join("inside.png"))?;
    std::os::unix::fs::symlink(dir.path(), data.join("up"))?;
    let lines = [
        r#"{"image": "images/a.png", "caption": "Kept."}"#.to_string(),
        r#"{"image": "images/../images/a.png", "caption": "Back inside."}"#.to_string(),
        r#"{"image": "inside.png", "caption": "A link that stays."}"#.to_string(),
        r#"{"image": "../secret.png", "caption": "Dot-dot."}"#.to_string(),
        format!(
            r#"{{"image": {:?}, "caption": "Absolute."}}"#,
            secret.display().to_string()
        ),
        r#"{"image": "images/escape.png", "caption": "A link out."}"#.to_string(),
        r#"{"image": "up/secret.png", "caption": "A folder link out."}"#.to_string(),
        r#"{"image": "../../../../../../etc/passwd", "caption": "Etc."}"#.to_string(),
        r#"{"image": "../gone.png", "caption": "Missing and outside."}"#.to_string(),
        r#"{"image": "gone.png", "caption": "Missing inside."}"#.to_string(),
    ];
    std::fs::write(data.join("m.jsonl"), lines.join("\n"))?;
    let c = load_source(
        &spec("kind = \"jsonl\"\npath = \"data/m.jsonl\"")?,
        &env(dir.path()),
    )?;
    assert_eq!(ids(&c), ["m/1", "m/2", "m/3"]);
    let sk = &c.skipped;
    assert_eq!(sk.count(SkipKind::OutsideRoot), 6);
    assert_eq!(sk.count(SkipKind::MissingImage), 1);
    assert_eq!(sk.total(), 7);
    let outside: Vec<_> = examples(&c)
        .into_iter()
        .filter(|(k, _)| *k == SkipKind::OutsideRoot)
        .map(|(_, line)| line)
        .collect();
    // Five examples are kept per kind.
    assert_eq!(outside, [Some(4), Some(5), Some(6), Some(7), Some(8)]);
    let link = &sk
        .examples()
        .iter()
        .find(|e| e.line == Some(6))
        .context("line 6")?
        .message;
    assert!(
        link.contains("outside the image root") && link.contains("allow-images-outside-root"),
        "{link}"
    );

    // The same manifest with the option: the files outside are read, and
    // only what does not exist is skipped.
    let allowed = load_source(
        &spec("kind = \"jsonl\"\npath = \"data/m.jsonl\"\nallow-images-outside-root = true")?,
        &env(dir.path()),
    )?;
    assert_eq!(allowed.skipped.count(SkipKind::OutsideRoot), 0);
    assert_eq!(
        &ids(&allowed)[..7],
        ["m/1", "m/2", "m/3", "m/4", "m/5", "m/6", "m/7"]
    );
    // Line 8 (/etc/passwd) is kept or missing depending on this machine.
    assert_eq!(allowed.records.len() + allowed.skipped.total(), 10);
    assert_eq!(
        allowed.skipped.count(SkipKind::MissingImage),
        10 - allowed.records.len()
    );

    // LLaVA JSON goes through the same check, against its image root.
    let json = format!(
        "[{},{}]",
        llava_entry("in", "a.png", "<image>", "Kept."),
        llava_entry("out", "../../secret.png", "<image>", "Out.")
    );
    std::fs::write(data.join("l.json"), json)?;
    let l = load_source(
        &spec("kind = \"llava-json\"\npath = \"data/l.json\"\nimage-root = \"data/images\"")?,
        &env(dir.path()),
    )?;
    assert_eq!(ids(&l), ["l/in"]);
    assert_eq!(l.skipped.count(SkipKind::OutsideRoot), 1);
    Ok(())
}

#[test]
fn integer_labels_are_class_indices() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    write_png(&dir.path().join("a.png"), 1)?;
    std::fs::write(
        dir.path().join("m.jsonl"),
        concat!(
            r#"{"image": "a.png", "caption": "x", "label": 3}"#,
            "\n",
            r#"{"image": "a.png", "caption": "y", "label": "7"}"#,
            "\n",
            r#"{"image": "a.png", "caption": "z", "label": -1}"#,
            "\n",
            r#"{"image": "a.png", "caption": "w"}"#,
            "\n",
        ),
    )?;
    let c = load_source(
        &spec("kind = \"jsonl\"\npath = \"m.jsonl\"")?,
        &env(dir.path()),
    )?;
    let labels: Vec<_> = c.records.iter().map(|r| r.label).collect();
    assert_eq!(labels, [Some(3), Some(7), None]);
    assert!(c.label_names.is_empty());
    assert_eq!(examples(&c), [(SkipKind::MalformedRecord, Some(3))]);
    Ok(())
}

#[test]
fn csv_manifest_skips_bad_rows_with_their_line_numbers() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    write_png(&dir.path().join("img").join("a.png"), 1)?;
    write_png(&dir.path().join("img").join("b.png"), 2)?;
    let text = "\u{feff}Image,Caption,label\n\
        a.png,A first caption,0\n\
        b.png,,1\n\
        b.png\n\
        ,no image here,2\n\
        missing.png,Gone,1\n\
        \"b.png\",\"A quoted, comma caption\",2\n\
        \n\
        a.png,extra,1,zzz\n\
        b.png,\"two\n\
        lines\",1\n";
    let path = dir.path().join("pairs.csv");
    std::fs::write(&path, text)?;
    let s = spec("kind = \"csv\"\npath = \"pairs.csv\"\nimage-root = \"img\"\nseed = 3")?;
    let c = load_source(&s, &env(dir.path()))?;

    assert_eq!(ids(&c), ["pairs/2", "pairs/7", "pairs/10"]);
    assert_eq!(c.records[1].caption, "A quoted, comma caption");
    assert_eq!(c.records[2].caption, "two\nlines");
    let labels: Vec<_> = c.records.iter().map(|r| r.label).collect();
    assert_eq!(labels, [Some(0), Some(2), Some(1)]);

    let sk = &c.skipped;
    assert_eq!(sk.count(SkipKind::EmptyCaption), 1);
    assert_eq!(sk.count(SkipKind::MalformedRecord), 3);
    assert_eq!(sk.count(SkipKind::MissingImage), 1);
    assert_eq!(sk.count(SkipKind::UndecodableImage), 0);
    assert_eq!(sk.total(), 5);
    assert_eq!(
        examples(&c),
        [
            (SkipKind::EmptyCaption, Some(3)),
            (SkipKind::MalformedRecord, Some(4)),
            (SkipKind::MalformedRecord, Some(5)),
            (SkipKind::MissingImage, Some(6)),
            (SkipKind::MalformedRecord, Some(9)),
        ]
    );
    assert!(sk.examples().iter().all(|e| e.file == path));
    let short = &sk
        .examples()
        .iter()
        .find(|e| e.line == Some(4))
        .context("line 4")?
        .message;
    assert!(short.contains("1 fields, the header has 3"), "{short}");
    Ok(())
}

#[test]
fn csv_columns_can_be_renamed_and_tsv_is_tab_separated() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    write_png(&dir.path().join("a.png"), 1)?;
    std::fs::write(
        dir.path().join("cc.tsv"),
        "filepath\ttitle\tdomain\na.png\tA, b and c\tweb\n",
    )?;
    let s = spec(
        r#"kind = "csv"
path = "cc.tsv"
columns = { image = "filepath", caption = "title", source = "domain" }"#,
    )?;
    let c = load_source(&s, &env(dir.path()))?;
    assert_eq!(ids(&c), ["web/2"]);
    assert_eq!(c.records[0].caption, "A, b and c");
    Ok(())
}

#[test]
fn unreadable_manifests_are_errors_naming_the_file() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let e = env(dir.path());
    let err = |toml_text: &str| -> anyhow::Result<String> {
        match load_source(&spec(toml_text)?, &e) {
            Ok(c) => bail!(
                "{toml_text}: expected an error, read {} records",
                c.records.len()
            ),
            Err(err) => Ok(err.to_string()),
        }
    };

    let m = err("kind = \"jsonl\"\npath = \"absent.jsonl\"")?;
    assert!(
        m.contains("absent.jsonl") && m.contains("cannot read"),
        "{m}"
    );

    std::fs::write(
        dir.path().join("page.jsonl"),
        "<html>\n<body>nope</body>\n</html>\n",
    )?;
    let m = err("kind = \"jsonl\"\npath = \"page.jsonl\"")?;
    assert!(
        m.contains("page.jsonl") && m.contains("not a JSONL manifest"),
        "{m}"
    );

    std::fs::write(
        dir.path().join("array.jsonl"),
        "[{\"image\": \"a.png\", \"caption\": \"b\"}]\n",
    )?;
    let m = err("kind = \"jsonl\"\npath = \"array.jsonl\"")?;
    assert!(m.contains("llava-json"), "{m}");

    std::fs::write(dir.path().join("notjson.json"), "id,image\n1,a.png\n")?;
    let m = err("kind = \"llava-json\"\npath = \"notjson.json\"")?;
    assert!(
        m.contains("notjson.json") && m.contains("not a LLaVA JSON array"),
        "{m}"
    );

    std::fs::write(dir.path().join("object.json"), "{\"id\": 1}")?;
    let m = err("kind = \"llava-json\"\npath = \"object.json\"")?;
    assert!(m.contains("object.json"), "{m}");

    let m = err("kind = \"llava-json\"\npath = \"absent.json\"")?;
    assert!(m.contains("absent.json"), "{m}");

    std::fs::write(dir.path().join("nocap.csv"), "image,text\na.png,hello\n")?;
    let m = err("kind = \"csv\"\npath = \"nocap.csv\"")?;
    assert!(
        m.contains("nocap.csv") && m.contains("no `caption` column") && m.contains("image, text"),
        "{m}"
    );

    std::fs::write(dir.path().join("empty.csv"), "")?;
    let m = err("kind = \"csv\"\npath = \"empty.csv\"")?;
    assert!(m.contains("empty.csv"), "{m}");

    let m = err("kind = \"jsonl\"\npath = \"a.jsonl\"\nname = \"a/b\"")?;
    assert!(m.contains("a/b"), "{m}");
    Ok(())
}

#[test]
fn source_specs_read_from_toml_and_reject_unknown_fields() -> anyhow::Result<()> {
    #[derive(serde::Deserialize)]
    struct Scenario {
        sources: Vec<SourceSpec>,
    }
    let s: Scenario = toml::from_str(
        r#"sources = [
  { kind = "fashion-mnist", split = "test", limit = 5000 },
  { kind = "llava-json", path = "blip_laion_cc_sbu_558k.json", image-root = "images" },
  { kind = "jsonl", path = "m.jsonl", name = "mine", seed = 7 },
  { kind = "csv", path = "m.csv", verify-images = true },
  { kind = "mnist" },
  { kind = "sklearn-digits", templates = "my-digits.toml" },
  { kind = "textile", limit = 300 },
  { kind = "photos" },
]"#,
    )?;
    let names: Vec<String> = s.sources.iter().map(SourceSpec::source_name).collect();
    assert_eq!(
        names,
        [
            "fashion-mnist",
            "blip_laion_cc_sbu_558k",
            "mine",
            "m",
            "mnist",
            "sklearn-digits",
            "textile",
            "photos"
        ]
    );
    match &s.sources[0] {
        SourceSpec::FashionMnist(f) => {
            assert_eq!(f.split, corpus::Split::Test);
            assert_eq!(f.common.limit.map(|l| l.get()), Some(5000));
        }
        other => bail!("parsed as {other:?}"),
    }
    assert_eq!(s.sources[2].common().seed, 7);
    assert_eq!(s.sources[0].required_assets(), ["fashion-mnist"]);
    assert_eq!(s.sources[7].required_assets(), ["skimage-photos"]);
    assert!(s.sources[1].required_assets().is_empty());

    // Serialised back, a spec reads the same.
    for src in &s.sources {
        let text = toml::to_string(src)?;
        assert_eq!(&toml::from_str::<SourceSpec>(&text)?, src, "{text}");
    }

    // Each is refused for the reason given (flattened common options keep
    // `deny_unknown_fields` working).
    for (bad, why) in [
        ("kind = \"mnist\"\nlimt = 5", "unknown field `limt`"),
        (
            "kind = \"jsonl\"\npath = \"m\"\nimage_root = \"x\"",
            "unknown field `image_root`",
        ),
        (
            "kind = \"csv\"\npath = \"m\"\ncolumns = { picture = \"p\" }",
            "unknown field `picture`",
        ),
        (
            "kind = \"mnist\"\nsplit = \"train\"",
            "unknown field `split`",
        ),
        ("kind = \"imagenet\"", "unknown variant `imagenet`"),
        (
            "kind = \"fashion-mnist\"\nsplit = \"val\"",
            "unknown variant `val`",
        ),
        ("kind = \"mnist\"\nlimit = 0", "nonzero"),
        ("kind = \"jsonl\"", "missing field `path`"),
    ] {
        match toml::from_str::<SourceSpec>(bad) {
            Ok(s) => bail!("accepted {bad:?} as {s:?}"),
            Err(e) => assert!(e.to_string().contains(why), "{bad:?}: {e}"),
        }
    }
    Ok(())
}

#[test]
fn limit_keeps_a_seeded_subset_in_file_order() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    write_png(&dir.path().join("a.png"), 1)?;
    let lines: Vec<String> = (0..20)
        .map(|i| format!(r#"{{"image": "a.png", "caption": "Caption {i}."}}"#))
        .collect();
    std::fs::write(dir.path().join("m.jsonl"), lines.join("\n"))?;
    let load = |seed: u64| -> anyhow::Result<Vec<String>> {
        let s = spec(&format!(
            "kind = \"jsonl\"\npath = \"m.jsonl\"\nlimit = 5\nseed = {seed}"
        ))?;
        Ok(load_source(&s, &env(dir.path()))?
            .records
            .into_iter()
            .map(|r| r.id)
            .collect())
    };
    let a = load(1)?;
    assert_eq!(a.len(), 5);
    assert_eq!(a, load(1)?, "same seed, same subset");
    let line = |id: &String| id.rsplit('/').next().and_then(|n| n.parse::<usize>().ok());
    let order: Vec<_> = a.iter().map(line).collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted, "kept in file order");
    assert!(
        (2..8).any(|s| load(s).is_ok_and(|b| b != a)),
        "seeds differ"
    );

    let all = spec("kind = \"jsonl\"\npath = \"m.jsonl\"\nlimit = 50")?;
    assert_eq!(load_source(&all, &env(dir.path()))?.records.len(), 20);
    Ok(())
}

#[test]
fn load_image_classifies_missing_and_undecodable() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let kind = |src: &ImageSource| load_image(src).err().map(|e| e.kind);

    assert_eq!(
        kind(&ImageSource::File(dir.path().join("none.png"))),
        Some(SkipKind::MissingImage)
    );
    assert_eq!(
        kind(&ImageSource::File(dir.path().to_path_buf())),
        Some(SkipKind::MissingImage),
        "a folder is no image file"
    );
    let text = dir.path().join("notes.png");
    std::fs::write(&text, "not an image at all")?;
    assert_eq!(
        kind(&ImageSource::File(text)),
        Some(SkipKind::UndecodableImage)
    );
    let empty = dir.path().join("empty.jpg");
    std::fs::write(&empty, "")?;
    assert_eq!(
        kind(&ImageSource::File(empty)),
        Some(SkipKind::UndecodableImage)
    );

    // JPEG: whole decodes, cut off does not (the decoder alone would fill
    // the missing rows with grey).
    let img = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 4, y as u8 * 5, 90]));
    let mut jpeg = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut jpeg),
        image::ImageFormat::Jpeg,
    )?;
    let whole = dir.path().join("whole.jpg");
    std::fs::write(&whole, &jpeg)?;
    assert_eq!(kind(&ImageSource::File(whole)), None);
    let cut = dir.path().join("cut.jpg");
    std::fs::write(&cut, &jpeg[..jpeg.len() * 2 / 3])?;
    assert_eq!(
        kind(&ImageSource::File(cut)),
        Some(SkipKind::UndecodableImage)
    );

    let raw = |channels: u8, len: usize| {
        ImageSource::Raw(Arc::new(RawImage {
            width: 3,
            height: 2,
            channels,
            pixels: vec![7; len],
        }))
    };
    let grey = load_image(&raw(1, 6)).map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!((grey.width(), grey.height()), (3, 2));
    assert_eq!(kind(&raw(3, 18)), None);
    assert_eq!(kind(&raw(3, 6)), Some(SkipKind::UndecodableImage));
    assert_eq!(kind(&raw(2, 12)), Some(SkipKind::UndecodableImage));
    Ok(())
}

#[test]
fn built_in_caption_files_parse_with_the_right_classes() -> anyhow::Result<()> {
    assert_eq!(offline::mnist_templates()?.classes.len(), 10);
    assert_eq!(offline::sklearn_digits_templates()?.classes.len(), 10);
    let textile = offline::textile_templates()?;
    assert_eq!(textile.classes.len(), offline::TEXTILE_CLASSES.len());
    let domains = [
        fedcmp_data::templates::CaptionTemplates::fashion_mnist()?.domain,
        offline::mnist_templates()?.domain,
        offline::sklearn_digits_templates()?.domain,
        textile.domain,
    ];
    for (i, d) in domains.iter().enumerate() {
        assert!(!domains[..i].contains(d), "domain {d} twice");
    }

    // Every photo is a file of the pinned asset, with several captions.
    let photos = offline::photo_captions()?;
    let asset = fedcmp_assets::find(offline::PHOTOS_ASSET)?;
    assert_eq!(photos.photos.len(), asset.files.len());
    for p in &photos.photos {
        assert!(
            asset
                .files
                .iter()
                .any(|f| f.path.ends_with(&format!("/{}", p.file))),
            "{} is not in the skimage-photos asset",
            p.file
        );
        assert!(p.captions.len() >= 3, "{}", p.file);
    }
    Ok(())
}

/// A fake asset cache with the real layout: `<cache>/assets/<asset>/<path>`.
fn fake_asset(cache: &Path, asset: &str, rel: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let path = fedcmp_assets::asset_path(cache, asset, rel);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, bytes)?;
    Ok(())
}

fn gzip(bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes)?;
    Ok(enc.finish()?)
}

fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        v.extend(d.to_be_bytes());
    }
    v.extend(data);
    v
}

#[test]
fn offline_readers_on_a_fake_cache() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cache = dir.path().join("cache");
    let e = env(dir.path());

    // Fashion-MNIST: 3 test images of 2x2.
    let fm = "usr/share/datasets/fashion-mnist";
    fake_asset(
        &cache,
        "fashion-mnist",
        &format!("{fm}/t10k-images-idx3-ubyte.gz"),
        &gzip(&idx(&[3, 2, 2], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]))?,
    )?;
    fake_asset(
        &cache,
        "fashion-mnist",
        &format!("{fm}/t10k-labels-idx1-ubyte.gz"),
        &gzip(&idx(&[3], &[9, 0, 3]))?,
    )?;
    let c = load_source(&spec("kind = \"fashion-mnist\"\nsplit = \"test\"")?, &e)?;
    assert_eq!(
        ids(&c),
        [
            "fashion-mnist/test/0",
            "fashion-mnist/test/1",
            "fashion-mnist/test/2"
        ]
    );
    let labels: Vec<_> = c.records.iter().map(|r| r.label).collect();
    assert_eq!(labels, [Some(9), Some(0), Some(3)]);
    assert_eq!(c.label_names["fashion-mnist"][9], "an ankle boot");
    assert!(c.skipped.total() == 0);
    match &c.records[1].image {
        ImageSource::Raw(raw) => {
            assert_eq!((raw.width, raw.height, raw.channels), (2, 2, 1));
            assert_eq!(raw.pixels, [4, 5, 6, 7]);
        }
        other => bail!("expected raw pixels, got {other:?}"),
    }
    // The train split is not in this cache: a clear error saying what to run.
    let m = load_source(&spec("kind = \"fashion-mnist\"")?, &e)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(m.contains("fedcmp assets fetch fashion-mnist"), "{m}");

    // MNIST: two 28x28 images of each digit as floats.
    for d in 0..10u8 {
        let mut data = vec![0.0f32; 2 * 784];
        data[0] = 1.0;
        data[1] = 0.5;
        data[784] = f32::from(d) / 10.0;
        let json = serde_json::json!({ "data": data });
        fake_asset(
            &cache,
            "mnist",
            &format!("src/digits/{d}.json"),
            json.to_string().as_bytes(),
        )?;
    }
    let c = load_source(&spec("kind = \"mnist\"\nseed = 4")?, &e)?;
    assert_eq!(c.records.len(), 20);
    assert_eq!(c.records[5].id, "mnist/all/5");
    assert_eq!(c.records[5].label, Some(2));
    match &c.records[5].image {
        ImageSource::Raw(raw) => {
            assert_eq!((raw.width, raw.height), (28, 28));
            assert_eq!(raw.pixels[0], 51, "0.2 * 255");
        }
        other => bail!("expected raw pixels, got {other:?}"),
    }
    match &c.records[4].image {
        ImageSource::Raw(raw) => assert_eq!(&raw.pixels[..3], [255, 128, 0]),
        other => bail!("expected raw pixels, got {other:?}"),
    }
    let names = &offline::mnist_templates()?.classes;
    assert!(c.records.iter().all(|r| {
        let label = r.label.unwrap_or(99) as usize;
        let caption = r.caption.to_lowercase();
        names[label]
            .names
            .iter()
            .any(|n| caption.contains(n.as_str()))
    }));
    // Deterministic, and `limit` does not change the kept records' captions.
    let again = load_source(&spec("kind = \"mnist\"\nseed = 4")?, &e)?;
    assert_eq!(c.records, again.records);
    let some = load_source(&spec("kind = \"mnist\"\nseed = 4\nlimit = 6")?, &e)?;
    assert_eq!(some.records.len(), 6);
    for r in &some.records {
        assert!(c.records.contains(r), "{} changed under limit", r.id);
    }
    let other = load_source(&spec("kind = \"mnist\"\nseed = 5")?, &e)?;
    assert_ne!(
        c.records.iter().map(|r| &r.caption).collect::<Vec<_>>(),
        other.records.iter().map(|r| &r.caption).collect::<Vec<_>>()
    );

    // scikit-learn digits: three 8x8 rows.
    let mut csv = String::new();
    for (row, digit) in [(0u32, 0u32), (16, 7), (8, 9)] {
        let mut values = vec![row.to_string(); 64];
        values.push(digit.to_string());
        csv.push_str(&values.join(","));
        csv.push('\n');
    }
    fake_asset(
        &cache,
        "sklearn-digits",
        "sklearn/datasets/data/digits.csv.gz",
        &gzip(csv.as_bytes())?,
    )?;
    let c = load_source(&spec("kind = \"sklearn-digits\"\nname = \"digits\"")?, &e)?;
    assert_eq!(ids(&c), ["digits/all/0", "digits/all/1", "digits/all/2"]);
    assert_eq!(
        c.records.iter().map(|r| r.label).collect::<Vec<_>>(),
        [Some(0), Some(7), Some(9)]
    );
    assert_eq!(c.records[0].source, "digits");
    match (&c.records[1].image, &c.records[2].image) {
        (ImageSource::Raw(a), ImageSource::Raw(b)) => {
            assert_eq!(
                (a.width, a.height, a.pixels[0], b.pixels[0]),
                (8, 8, 255, 128)
            );
        }
        other => bail!("expected raw pixels, got {other:?}"),
    }

    // Textile: every pinned file, here empty stand-ins (only existence is
    // checked while reading).
    let textile = fedcmp_assets::find("textile")?;
    for f in textile.files {
        fake_asset(&cache, "textile", f.path, b"")?;
    }
    let c = load_source(&spec("kind = \"textile\"\nlimit = 30\nseed = 2")?, &e)?;
    assert_eq!(c.records.len(), 30);
    assert_eq!(c.label_names["textile"].len(), 3);
    for r in &c.records {
        let class = r.id.split('/').nth(1).unwrap_or_default();
        let label = r.label.unwrap_or(99) as usize;
        assert_eq!(
            offline::TEXTILE_CLASSES.get(label),
            Some(&class),
            "{}",
            r.id
        );
        assert!(matches!(&r.image, ImageSource::File(p) if p.is_file()));
    }
    let all = load_source(&spec("kind = \"textile\"")?, &e)?;
    assert_eq!(all.records.len(), 2000);
    for (class, n) in [(0, 1000), (1, 500), (2, 500)] {
        assert_eq!(
            all.records
                .iter()
                .filter(|r| r.label == Some(class))
                .count(),
            n
        );
    }
    assert!(all.records.iter().any(|r| r.id == "textile/local/0500"));

    // Photos: one record per listed photo, caption from its own list.
    for f in fedcmp_assets::find("skimage-photos")?.files {
        fake_asset(&cache, "skimage-photos", f.path, b"")?;
    }
    let c = load_source(&spec("kind = \"photos\"\nseed = 1")?, &e)?;
    let captions = offline::photo_captions()?;
    assert_eq!(c.records.len(), captions.photos.len());
    assert_eq!(c.records[0].id, "photos/astronaut");
    for (r, p) in c.records.iter().zip(&captions.photos) {
        assert!(p.captions.contains(&r.caption), "{}: {}", r.id, r.caption);
    }
    assert_eq!(c.label_names["photos"][1], "cat");

    // A user template file replaces the built-in one; it must name the
    // source's classes.
    std::fs::write(
        dir.path().join("two.toml"),
        "domain = \"x\"\ntemplates = [\"{label}\"]\n[[classes]]\nnames = [\"a\"]\n[[classes]]\nnames = [\"b\"]\n",
    )?;
    let m = load_source(&spec("kind = \"textile\"\ntemplates = \"two.toml\"")?, &e)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(m.contains("two.toml") && m.contains("2 classes"), "{m}");
    Ok(())
}

#[test]
fn offline_sources_say_what_to_fetch_when_the_cache_is_empty() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for (kind, asset) in [
        ("mnist", "mnist"),
        ("sklearn-digits", "sklearn-digits"),
        ("textile", "textile"),
        ("photos", "skimage-photos"),
        ("fashion-mnist", "fashion-mnist"),
    ] {
        let s = spec(&format!("kind = \"{kind}\""))?;
        assert_eq!(s.required_assets(), [asset]);
        let m = load_source(&s, &env(dir.path()))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            m.contains(&format!("fedcmp assets fetch {asset}")),
            "{kind}: {m}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The real cached assets.

fn real_env() -> anyhow::Result<SourceEnv> {
    Ok(SourceEnv::new(fedcmp_assets::cache_root(None)?))
}

/// Every record decodes, with the expected size.
fn decodes(c: &Corpus, side: Option<u32>) -> anyhow::Result<()> {
    for r in &c.records {
        let img = load_image(&r.image).map_err(|e| anyhow::anyhow!("{}: {e}", r.id))?;
        if let Some(s) = side {
            assert_eq!((img.width(), img.height()), (s, s), "{}", r.id);
        }
    }
    Ok(())
}

fn per_label(c: &Corpus, classes: u32) -> Vec<usize> {
    (0..classes)
        .map(|l| c.records.iter().filter(|r| r.label == Some(l)).count())
        .collect()
}

#[test]
#[ignore = "needs the real assets: run `fedcmp assets fetch` first"]
fn real_fashion_mnist() -> anyhow::Result<()> {
    let e = real_env()?;
    let train = load_source(&spec("kind = \"fashion-mnist\"")?, &e)?;
    assert_eq!(train.records.len(), 60_000);
    assert_eq!(per_label(&train, 10), vec![6000; 10]);
    let test = load_source(
        &spec("kind = \"fashion-mnist\"\nsplit = \"test\"\nlimit = 100")?,
        &e,
    )?;
    assert_eq!(test.records.len(), 100);
    decodes(&test, Some(28))?;
    println!("{}: {}", test.records[0].id, test.records[0].caption);
    Ok(())
}

#[test]
#[ignore = "needs the real assets: run `fedcmp assets fetch` first"]
fn real_mnist() -> anyhow::Result<()> {
    let c = load_source(&spec("kind = \"mnist\"")?, &real_env()?)?;
    assert_eq!(c.records.len(), 10_000);
    assert_eq!(
        per_label(&c, 10),
        [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]
    );
    decodes(&c, Some(28))?;
    // Digits are bright strokes on a dark ground.
    if let ImageSource::Raw(raw) = &c.records[0].image {
        let bright = raw.pixels.iter().filter(|&&p| p > 128).count();
        assert!((40..400).contains(&bright), "{bright} bright pixels");
    }
    println!("{}: {}", c.records[0].id, c.records[0].caption);
    Ok(())
}

#[test]
#[ignore = "needs the real assets: run `fedcmp assets fetch` first"]
fn real_sklearn_digits() -> anyhow::Result<()> {
    let c = load_source(&spec("kind = \"sklearn-digits\"")?, &real_env()?)?;
    assert_eq!(c.records.len(), 1797);
    assert_eq!(
        per_label(&c, 10),
        [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    );
    decodes(&c, Some(8))?;
    println!("{}: {}", c.records[0].id, c.records[0].caption);
    Ok(())
}

#[test]
#[ignore = "needs the real assets: run `fedcmp assets fetch` first"]
fn real_textile() -> anyhow::Result<()> {
    let e = real_env()?;
    let c = load_source(&spec("kind = \"textile\"")?, &e)?;
    assert_eq!(per_label(&c, 3), [1000, 500, 500]);
    let some = load_source(&spec("kind = \"textile\"\nlimit = 60")?, &e)?;
    decodes(&some, Some(250))?;
    println!("{}: {}", some.records[0].id, some.records[0].caption);
    Ok(())
}

#[test]
#[ignore = "needs the real assets: run `fedcmp assets fetch` first"]
fn real_photos() -> anyhow::Result<()> {
    let c = load_source(&spec("kind = \"photos\"")?, &real_env()?)?;
    assert_eq!(c.records.len(), 16);
    decodes(&c, None)?;
    for r in &c.records {
        println!("{}: {}", r.id, r.caption);
    }
    Ok(())
}
