#![allow(clippy::result_large_err)] // figment::Jail closures return figment::Error by design
use crate::*;
use figment::Jail;

fn loader() -> ConfigLoader {
    ConfigLoader::new().set("data.format=synthetic")
}

#[test]
fn defaults_are_the_papers() {
    let c = Config::default();
    assert_eq!(c.method.kind, MethodKind::Qud);
    assert_eq!(c.method.tau, 0.1);
    assert_eq!(c.method.queue_size, 1024);
    assert_eq!(c.method.queue_kind, QueueKind::Fifo);
    assert_eq!(c.optim.lr, 0.1);
    assert_eq!(c.optim.batch_size, 512);
    assert_eq!(c.optim.momentum, 0.9);
    assert_eq!(c.optim.weight_decay, 5e-4);
    assert_eq!(c.optim.grad_clip, 5.0);
    assert_eq!(c.optim.lr_milestones, vec![8, 14, 20, 25]);
    assert_eq!(c.data.flip_prob, 0.5);
    c.validate().expect("the defaults are valid");
}

#[test]
fn each_layer_overrides_the_one_below() {
    Jail::expect_with(|jail| {
        jail.clear_env();
        jail.create_file(
            "run.toml",
            "[optim]\nlr = 0.2\nepochs = 10\nmomentum = 0.8\n[method]\ntau = 0.2\n",
        )?;
        jail.set_env("QUD_OPTIM__LR", "0.3");
        jail.set_env("QUD_OPTIM__MOMENTUM", "0.7");
        let c = loader()
            .file("run.toml")
            .set("optim.lr=0.4")
            .load()
            .map_err(|e| e.to_string())?;
        assert_eq!(c.optim.lr, 0.4, "--set beats environment");
        assert_eq!(c.optim.momentum, 0.7, "environment beats file");
        assert_eq!(c.optim.epochs, 10, "file beats defaults");
        assert_eq!(c.method.tau, 0.2, "file beats defaults");
        assert_eq!(c.optim.batch_size, 512, "defaults fill the rest");
        Ok(())
    });
}

#[test]
fn later_overrides_win_and_values_are_typed() {
    Jail::expect_with(|jail| {
        jail.clear_env();
        let c = loader()
            .set("optim.lr=0.5")
            .set("optim.lr=0.05")
            .set("data.root=/data/ms1m/train.rec")
            .set(r#"run.devices=["cuda:0", "cuda:1"]"#)
            .set("optim.lr_milestones=[2,4]")
            .set("method.queue_kind=simq")
            .load()
            .map_err(|e| e.to_string())?;
        assert_eq!(c.optim.lr, 0.05);
        assert_eq!(
            c.data.root.as_deref(),
            Some(std::path::Path::new("/data/ms1m/train.rec"))
        );
        assert_eq!(c.run.devices, vec!["cuda:0", "cuda:1"]);
        assert_eq!(c.optim.lr_milestones, vec![2, 4]);
        assert_eq!(c.method.queue_kind, QueueKind::Simq);
        Ok(())
    });
}

#[test]
fn unknown_keys_name_the_key_and_its_source() {
    Jail::expect_with(|jail| {
        jail.clear_env();
        jail.create_file("bad.toml", "[optim]\nlrr = 0.2\n")?;
        let err = loader().file("bad.toml").load().unwrap_err().to_string();
        assert!(err.contains("`optim.lrr`"), "{err}");
        assert!(err.contains("config file bad.toml"), "{err}");

        jail.create_file("bad_section.toml", "[optimizer]\nlr = 0.2\n")?;
        let err = loader()
            .file("bad_section.toml")
            .load()
            .unwrap_err()
            .to_string();
        assert!(err.contains("`optimizer`"), "{err}");

        jail.set_env("QUD_METHOD__TAUU", "0.3");
        let err = loader().load().unwrap_err().to_string();
        assert!(err.contains("`method.tauu`"), "{err}");
        assert!(err.contains("environment variables QUD_*"), "{err}");
        Ok(())
    });
    Jail::expect_with(|jail| {
        jail.clear_env();
        let err = loader().set("run.sede=3").load().unwrap_err().to_string();
        assert!(err.contains("`run.sede`"), "{err}");
        assert!(err.contains("--set run.sede=3"), "{err}");
        Ok(())
    });
}

#[test]
fn wrong_types_name_the_key_and_its_source() {
    Jail::expect_with(|jail| {
        jail.clear_env();
        jail.create_file("t.toml", "[optim]\nbatch_size = \"big\"\n")?;
        let err = loader().file("t.toml").load().unwrap_err();
        assert!(matches!(err, ConfigError::BadValue { .. }), "{err}");
        let err = err.to_string();
        assert!(err.contains("optim.batch_size"), "{err}");
        assert!(err.contains("config file t.toml"), "{err}");

        let err = loader()
            .set("method.queue_kind=lifo")
            .load()
            .unwrap_err()
            .to_string();
        assert!(err.contains("method.queue_kind"), "{err}");
        assert!(err.contains("lifo"), "{err}");
        Ok(())
    });
}

#[test]
fn each_invalid_value_gives_its_rule() {
    let cases: &[(&str, &str, &str)] = &[
        ("method.tau=0", "method.tau", "> 0"),
        ("method.tau=-0.1", "method.tau", "> 0"),
        ("method.queue_size=0", "method.queue_size", ">= 1"),
        // Issue 31: sizes no machine holds abort in the allocator unless refused here.
        (
            "method.queue_size=100000000000",
            "method.queue_size",
            "16 GiB",
        ),
        ("data.prefetch=1000000000000", "data.prefetch", "64 GiB"),
        ("optim.batch_size=0", "optim.batch_size", ">= 1"),
        (
            "optim.lr_milestones=[8,20,14]",
            "optim.lr_milestones",
            "strictly increasing",
        ),
        (
            "optim.lr_milestones=[8,8]",
            "optim.lr_milestones",
            "strictly increasing",
        ),
        ("optim.lr_milestones=[0,8]", "optim.lr_milestones", ">= 1"),
        ("optim.momentum=1.0", "optim.momentum", "[0, 1)"),
        ("optim.lr=-1", "optim.lr", "> 0"),
        ("optim.grad_clip=-5", "optim.grad_clip", ">= 0"),
        ("data.flip_prob=1.5", "data.flip_prob", "[0, 1]"),
        (
            "teacher.embedding_dim=256",
            "teacher.embedding_dim",
            "student.embedding_dim",
        ),
        ("run.devices=[]", "run.devices", "at least one"),
    ];
    Jail::expect_with(|jail| {
        jail.clear_env();
        for (set, field, rule) in cases {
            let err = loader().set(*set).load().unwrap_err();
            let ConfigError::Invalid(list) = &err else {
                panic!("{set}: expected a validation error, got {err}");
            };
            assert_eq!(list.len(), 1, "{set}: {err}");
            assert_eq!(list[0].field, *field, "{set}");
            let text = err.to_string();
            assert!(text.contains(field) && text.contains(rule), "{set}: {text}");
        }
        Ok(())
    });
}

#[test]
fn several_broken_rules_are_reported_together() {
    Jail::expect_with(|jail| {
        jail.clear_env();
        let err = loader()
            .set("method.tau=0")
            .set("optim.batch_size=0")
            .load()
            .unwrap_err();
        let ConfigError::Invalid(list) = err else {
            panic!("{err}")
        };
        let fields: Vec<_> = list.iter().map(|i| i.field).collect();
        assert_eq!(fields, vec!["method.tau", "optim.batch_size"]);
        Ok(())
    });
}

#[test]
fn missing_file_and_malformed_inputs_are_errors() {
    Jail::expect_with(|jail| {
        jail.clear_env();
        let err = loader().file("nope.toml").load().unwrap_err();
        assert!(matches!(err, ConfigError::MissingFile(_)));
        assert!(err.to_string().contains("nope.toml"));

        // A wrong element of an array names the file the array is in.
        jail.create_file("milestones.toml", "[optim]\nlr_milestones = [8, -1]\n")?;
        let err = loader()
            .file("milestones.toml")
            .load()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("optim.lr_milestones.1") && err.contains("milestones.toml"),
            "{err}"
        );

        jail.create_file("broken.toml", "[optim\nlr = 1\n")?;
        let err = loader().file("broken.toml").load().unwrap_err().to_string();
        assert!(err.contains("config file broken.toml"), "{err}");

        let err = loader().set("optim.lr").load().unwrap_err();
        assert!(matches!(err, ConfigError::BadOverride(_)), "{err}");
        let err = loader().set("=3").load().unwrap_err();
        assert!(matches!(err, ConfigError::BadOverride(_)), "{err}");
        Ok(())
    });
}

#[test]
fn resolved_config_round_trips_through_toml() {
    Jail::expect_with(|jail| {
        jail.clear_env();
        let c = loader()
            .set("optim.lr=0.025")
            .set("method.queue_kind=dissimq")
            .set("data.root=/tmp/faces")
            .set("run.seed=7")
            .load()
            .map_err(|e| e.to_string())?;
        let path = jail.directory().join("resolved.toml");
        c.write_toml(&path).map_err(|e| e.to_string())?;
        assert!(
            !path.with_extension("toml.tmp").exists(),
            "temp file renamed away"
        );
        let back = ConfigLoader::new()
            .file(&path)
            .load()
            .map_err(|e| e.to_string())?;
        assert_eq!(back, c);
        Ok(())
    });
}

#[test]
fn embedded_config_sits_between_defaults_and_file() {
    Jail::expect_with(|jail| {
        jail.clear_env();
        jail.create_file("f.toml", "[optim]\nepochs = 3\n")?;
        let c = ConfigLoader::new()
            .embedded(
                "demo",
                "[data]\nformat = \"synthetic\"\n[optim]\nepochs = 2\nbatch_size = 32\n",
            )
            .file("f.toml")
            .load()
            .map_err(|e| e.to_string())?;
        assert_eq!(c.data.format, DataFormat::Synthetic);
        assert_eq!(c.optim.epochs, 3);
        assert_eq!(c.optim.batch_size, 32);
        Ok(())
    });
}

#[test]
fn lr_schedule_follows_the_reference_formula() {
    // Reference: lr0 * 0.1 ** len([m for m in milestones if m - 1 <= epoch])
    let mut o = OptimConfig {
        batch_size: 256,
        ..OptimConfig::default()
    };
    let lr0 = 0.1 * 256.0 / 512.0;
    assert_eq!(o.scaled_lr(), lr0);
    let expected = |e: usize| -> f64 {
        let n = o
            .lr_milestones
            .iter()
            .filter(|&&m| (m as f64) - 1.0 <= e as f64)
            .count();
        lr0 * 0.1f64.powi(n as i32)
    };
    for e in 0..30 {
        assert_eq!(o.lr_at_epoch(e), expected(e), "epoch {e}");
    }
    // MS1MV2 schedule: milestone 8 first applies at epoch index 7.
    assert_eq!(o.lr_at_epoch(6), lr0);
    assert!((o.lr_at_epoch(7) - lr0 * 0.1).abs() < 1e-15);
    assert!((o.lr_at_epoch(25) - lr0 * 1e-4).abs() < 1e-15);
    o.lr_milestones = vec![];
    assert_eq!(o.lr_at_epoch(100), lr0);
}

#[test]
fn the_total_batch_gives_every_device_two_samples() {
    let devices = r#"run.devices=["cpu:0", "cpu:1", "cpu:2"]"#;
    let err = loader()
        .without_env()
        .set(devices)
        .set("optim.batch_size=5")
        .load()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("optim.batch_size") && err.contains("5 over 3 devices"),
        "{err}"
    );
    let ok = loader()
        .without_env()
        .set(devices)
        .set("optim.batch_size=6")
        .load()
        .unwrap();
    assert_eq!(ok.run.devices.len(), 3);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

    /// The shipped configs with characters replaced or cut short (TOML syntax, key names, values
    /// out of range: `1e400`, `-1`, `nan`): a config or an error naming the file, never a panic.
    #[test]
    fn damaged_configs_load_or_fail_cleanly(
        pick in 0usize..64,
        edits in proptest::collection::vec(
            (0.0f64..1.0, proptest::sample::select(vec![
                "=", "[", "]", "\"", "\n", "0", "-1", "1e400", "nan", "inf", "x", "",
                "18446744073709551616", "true",
            ])),
            1..5),
        cut in proptest::option::of(0.0f64..1.0),
    ) {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut configs: Vec<std::path::PathBuf> = ["paper", "real", "."]
            .iter()
            .flat_map(|d| std::fs::read_dir(root.join(d)).unwrap().flatten().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        configs.sort();
        let mut text = std::fs::read_to_string(&configs[pick % configs.len()]).unwrap();
        for (at, with) in edits {
            let mut i = ((text.len() as f64 * at) as usize).min(text.len());
            while !text.is_char_boundary(i) {
                i -= 1;
            }
            let end = text[i..].chars().next().map_or(i, |c| i + c.len_utf8());
            text.replace_range(i..end, with);
        }
        if let Some(cut) = cut {
            let mut n = (text.len() as f64 * cut) as usize;
            while !text.is_char_boundary(n) {
                n -= 1;
            }
            text.truncate(n);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("damaged.toml");
        std::fs::write(&path, &text).unwrap();
        if let Err(e) = ConfigLoader::new().without_env().file(&path).load() {
            let message = e.to_string();
            proptest::prop_assert!(
                message.contains("damaged.toml") || matches!(e, ConfigError::Invalid(_)),
                "{}", message
            );
        }
    }
}
