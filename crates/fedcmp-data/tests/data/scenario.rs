//! Scenarios resolve deterministically, cover the training split exactly
//! once, never deal held-out records, and the built-in files are valid.

use std::path::Path;

use anyhow::Result;
use fedcmp_data::record::Corpus;
use fedcmp_data::scenario::{built_in_names, Scenario};

/// A JSONL corpus of `n` records over three labels and two sources, with
/// real (tiny) PNG files.
fn write_corpus(dir: &Path, n: usize) -> Result<()> {
    let mut lines = String::new();
    for i in 0..n {
        let name = format!("img{i}.png");
        image::GrayImage::from_pixel(4, 4, image::Luma([(i * 7 % 256) as u8]))
            .save(dir.join(&name))?;
        let source = if i % 2 == 0 { "left" } else { "right" };
        lines.push_str(&format!(
            "{{\"image\": \"{name}\", \"caption\": \"picture {i}\", \"label\": {}, \"source\": \"{source}\"}}\n",
            i % 3
        ));
    }
    std::fs::write(dir.join("corpus.jsonl"), lines)?;
    Ok(())
}

fn scenario(partition: &str, clients: usize) -> String {
    format!(
        "name = \"t\"\nclients = {clients}\nseed = 4\n\
         sources = [{{ kind = \"jsonl\", path = \"corpus.jsonl\" }}]\n\
         split = {{ validation = 0.1, test = 0.2 }}\n\
         partition = {partition}\n"
    )
}

fn no_clusters(_: &Corpus, _: &[usize], _: usize) -> fedcmp_data::Result<Vec<u32>> {
    Err(fedcmp_data::DataError::Malformed {
        path: "test".into(),
        message: "labels exist: clustering must not run".into(),
    })
}

#[test]
fn scenarios_are_deterministic_and_cover_the_train_split_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    write_corpus(dir.path(), 120)?;
    for partition in [
        "{ kind = \"iid\" }",
        "{ kind = \"dirichlet\", alpha = 0.5, key = \"source-concept\", min-size = 2 }",
        "{ kind = \"by-source\", clients-per-source = 2 }",
        "{ kind = \"power-law\", ratio = 4.0, inner = { kind = \"iid\" } }",
    ] {
        let path = dir.path().join("s.toml");
        std::fs::write(&path, scenario(partition, 4))?;
        let (s, base) = Scenario::load(&path.to_string_lossy())?;
        let a = s.build(dir.path(), &base, &mut no_clusters)?;
        let b = s.build(dir.path(), &base, &mut no_clusters)?;
        assert_eq!(a.plan, b.plan, "{partition}: not deterministic");
        let mut dealt: Vec<usize> = a.plan.shards.iter().flatten().copied().collect();
        dealt.sort_unstable();
        let mut train = a.plan.splits.train.clone();
        train.sort_unstable();
        assert_eq!(
            dealt, train,
            "{partition}: shards must be the train split, once each"
        );
        for held_out in a.plan.splits.validation.iter().chain(&a.plan.splits.test) {
            assert!(
                !dealt.contains(held_out),
                "{partition}: held-out record dealt"
            );
        }
        assert_eq!(a.plan.splits.test.len(), 24, "20% of each source");
        assert_eq!(a.summary.shards.len(), 4);
    }
    Ok(())
}

#[test]
fn another_seed_deals_differently() -> Result<()> {
    let dir = tempfile::tempdir()?;
    write_corpus(dir.path(), 60)?;
    let path = dir.path().join("s.toml");
    std::fs::write(&path, scenario("{ kind = \"iid\" }", 3))?;
    let (mut s, base) = Scenario::load(&path.to_string_lossy())?;
    let a = s.build(dir.path(), &base, &mut no_clusters)?;
    s.seed += 1;
    let b = s.build(dir.path(), &base, &mut no_clusters)?;
    assert_ne!(a.plan.shards, b.plan.shards);
    Ok(())
}

#[test]
fn unlabelled_records_get_concepts_from_the_cluster_hook() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut lines = String::new();
    for i in 0..30 {
        let name = format!("u{i}.png");
        image::GrayImage::from_pixel(4, 4, image::Luma([i as u8])).save(dir.path().join(&name))?;
        lines.push_str(&format!(
            "{{\"image\": \"{name}\", \"caption\": \"x {i}\"}}\n"
        ));
    }
    std::fs::write(dir.path().join("corpus.jsonl"), lines)?;
    let path = dir.path().join("s.toml");
    std::fs::write(
        &path,
        scenario(
            "{ kind = \"dirichlet\", alpha = 0.1, key = \"concept\", min-size = 1 }",
            2,
        ) + "concepts = { clusters = 3 }\n",
    )?;
    let (s, base) = Scenario::load(&path.to_string_lossy())?;
    let mut calls = 0;
    let f = s.build(
        dir.path(),
        &base,
        &mut |_: &Corpus, idx: &[usize], k: usize| {
            calls += 1;
            assert_eq!(k, 3);
            Ok(idx.iter().map(|i| (i % 3) as u32).collect())
        },
    )?;
    assert_eq!(calls, 1, "one source, clustered once");
    assert!(f.items.items.iter().all(|it| it.cluster.is_some()));
    Ok(())
}

#[test]
fn built_in_scenarios_parse_and_match_the_spec() -> Result<()> {
    let names = built_in_names();
    assert_eq!(
        names,
        vec!["iid", "concept-skew", "domain-silos", "cross-device"]
    );
    let clients: Vec<usize> = names
        .iter()
        .map(|n| Scenario::load(n).map(|(s, _)| s.clients.get()))
        .collect::<fedcmp_data::Result<_>>()?;
    assert_eq!(clients, vec![8, 8, 8, 64]);
    let (s4, _) = Scenario::load("cross-device")?;
    assert_eq!(s4.participation.clients_per_round.map(|k| k.get()), Some(8));
    assert!((s4.participation.dropout - 0.1).abs() < 1e-12);
    Ok(())
}

#[test]
fn bad_scenario_files_name_the_problem() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bad.toml");
    for (text, needle) in [
        (
            scenario("{ kind = \"iid\" }", 2) + "colour = \"red\"\n",
            "colour",
        ),
        (
            scenario("{ kind = \"dirichlet\", alpha = -1.0, key = \"label\" }", 2),
            "alpha",
        ),
        (
            scenario("{ kind = \"iid\" }", 2) + "participation = { clients-per-round = 3 }\n",
            "clients-per-round",
        ),
    ] {
        std::fs::write(&path, text)?;
        let err = Scenario::load(&path.to_string_lossy())
            .err()
            .map(|e| e.to_string());
        let msg = err.unwrap_or_default();
        assert!(msg.contains(needle) && msg.contains("bad.toml"), "{msg}");
    }
    assert!(Scenario::load("no-such-scenario").is_err());
    Ok(())
}
