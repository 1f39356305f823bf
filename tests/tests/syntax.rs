//! The syntax guides (e2e-pos, e2e-spans) served by dlm-guide and steering the shipped generator:
//! requests checked field by field, and tags and constituents that guidance actually changes, read
//! by the labeller the guides were trained with (guide/train/syntax_labels.py, Debian's tagger and
//! link grammar parser, installed by deploy/setup.sh).

use std::path::Path;

use dlm_generator::eval::syntax::{
    pos_rates, span_rate, Labeller, SpanTarget, SyntaxLabels, SyntaxTarget,
};
use dlm_proto::dlm::v1 as pb;
use dlm_tests::{data_dir, repo_root, texts};
use tonic::Code;

const GUIDES: [&str; 2] = ["e2e-pos", "e2e-spans"];

/// The guides' labeller on `texts`, its truecaser fitted on `written_forms`.
fn label_with(written_forms: &Path, texts: &[String]) -> dlm_generator::Result<Vec<SyntaxLabels>> {
    Labeller {
        python: Path::new("/usr/bin/python3"),
        script: &repo_root().join("guide/train/syntax_labels.py"),
        written_forms,
    }
    .label(texts)
}

/// The same, fitted on the E2E train references.
fn label(texts: &[String]) -> Vec<SyntaxLabels> {
    label_with(&data_dir().join("trainset.csv"), texts).unwrap()
}

fn request(
    n: u32,
    seed: u64,
    syntax: Option<pb::Syntax>,
    length: Option<u32>,
) -> pb::GenerateRequest {
    pb::GenerateRequest {
        n,
        steps: Some(200),
        seed: Some(seed),
        length,
        syntax,
        ..Default::default()
    }
}

fn pos(tags: &str) -> Option<pb::Syntax> {
    Some(pb::Syntax {
        pos: tags.split_whitespace().map(String::from).collect(),
        ..Default::default()
    })
}

fn span(start: u32, end: u32, label: &str) -> Option<pb::Syntax> {
    Some(pb::Syntax {
        spans: vec![pb::Span {
            start,
            end,
            label: label.into(),
        }],
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syntax_requests_are_checked_field_by_field() {
    let (_guide, generator) = dlm_tests::stack(&GUIDES, &[]).await;
    let client = generator.client().await;
    let too_many = vec!["NN"; 39].join(" ");
    let bad: Vec<(pb::GenerateRequest, &str, &str)> = vec![
        (
            request(1, 1, pos("DT XYZ VBZ"), None),
            "syntax.pos",
            "`XYZ` (word 1)",
        ),
        (
            request(1, 1, pos("DT NN VBZ"), Some(5)),
            "syntax.pos",
            "3 tags but length is 5",
        ),
        (
            request(1, 1, pos(&too_many), None),
            "syntax.pos",
            "at most 38 words",
        ),
        (
            request(1, 1, span(5, 3, "NP"), None),
            "syntax.spans",
            "5..3",
        ),
        (
            request(1, 1, span(2, 6, "NP"), Some(6)),
            "syntax.spans",
            "the length, 6 words",
        ),
        (
            request(1, 1, span(0, 38, "NP"), None),
            "syntax.spans",
            "the canvas, 38 words",
        ),
        (
            request(1, 1, span(0, 1, "QQ"), None),
            "syntax.spans",
            "`QQ`",
        ),
        (
            request(
                1,
                1,
                Some(pb::Syntax {
                    pos: vec!["DT".into()],
                    weight: Some(f32::NAN),
                    ..Default::default()
                }),
                None,
            ),
            "syntax.weight",
            "NaN",
        ),
    ];
    for (req, field, detail) in bad {
        let err = client.clone().generate(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        assert!(err.message().contains(field), "{}", err.message());
        assert!(err.message().contains(detail), "{}", err.message());
    }
    // A tag sequence sets the length; "_" leaves a word free.
    let resp = client
        .clone()
        .generate(request(2, 3, pos("DT NN VBZ DT _ NN ."), None))
        .await
        .unwrap()
        .into_inner();
    for s in &resp.samples {
        assert_eq!(s.text.split_whitespace().count(), 7, "{}", s.text);
        assert!(
            s.scores.iter().any(|g| g.guide == "e2e-pos"),
            "{:?}",
            s.scores
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syntax_targets_need_a_guide_that_reads_them() {
    let (_guide, generator) = dlm_tests::stack(&["e2e-semantic"], &[]).await;
    let mut client = generator.client().await;
    for (req, field) in [
        (request(1, 1, pos("DT NN"), None), "syntax.pos"),
        (request(1, 1, span(0, 1, "NP"), None), "syntax.spans"),
    ] {
        let err = client.generate(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        assert!(err.message().contains(field), "{}", err.message());
        assert!(
            err.message().contains("no registered guide reads field"),
            "{}",
            err.message()
        );
    }
}

#[test]
fn a_labeller_without_its_references_names_the_file_it_lacks() {
    let missing = Path::new("/nonexistent/e2e/trainset.csv");
    let err = label_with(missing, &["the eagle is a pub .".to_string()])
        .unwrap_err()
        .to_string();
    // The child's own last words, not only a guess at missing packages.
    assert!(
        err.contains("No such file") && err.contains("/nonexistent/e2e/trainset.csv"),
        "{err}"
    );
}

#[test]
fn the_labeller_tags_and_parses_texts_as_the_generator_writes_them() {
    let got = label(&[
        "the eagle is a cheap pub near the river .".to_string(),
        "pub the the is .".to_string(),
        // The parser reads names cased and compound adjectives whole ("child friendly"), as
        // E2E's references write them; spans still index the generator's words.
        "aromi serves chinese food near the portland arms .".to_string(),
        "it is child friendly and has a high customer rating .".to_string(),
    ]);
    assert_eq!(
        got[0].pos,
        ["DT", "NN", "VBZ", "DT", "JJ", "NN", "IN", "DT", "NN", "."]
    );
    let spans = got[0]
        .spans
        .as_ref()
        .expect("a grammatical sentence parses");
    assert!(spans.contains(&(3, 5, "NP".into())), "{spans:?}");
    assert!(spans.contains(&(6, 8, "PP".into())), "{spans:?}");
    assert!(got[1].spans.is_none(), "{:?}", got[1].spans);
    let spans = |i: usize| got[i].spans.clone().expect("a grammatical sentence parses");
    assert!(spans(2).contains(&(4, 7, "PP".into())), "{:?}", spans(2));
    assert!(spans(3).contains(&(2, 3, "ADJP".into())), "{:?}", spans(3));
}

/// Guided by e2e-pos, texts take the asked tags far more often than unguided texts of the same
/// length and seeds; guided by e2e-spans, the asked constituent appears more often.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syntax_guides_steer_tags_and_constituents() {
    let (_guide, generator) = dlm_tests::stack(&GUIDES, &["--max-n", "16"]).await;
    let mut client = generator.client().await;
    let tags = "DT NN VBZ DT JJ NN IN DT NN NN .";
    let n = 8;
    let len = tags.split_whitespace().count() as u32;
    let guided = texts(
        client
            .generate(request(n, 11, pos(tags), None))
            .await
            .unwrap()
            .into_inner(),
    );
    let unguided = texts(
        client
            .generate(request(n, 11, None, Some(len)))
            .await
            .unwrap()
            .into_inner(),
    );
    let target = SyntaxTarget {
        reference: String::new(),
        length: len as usize,
        pos: tags.split_whitespace().map(String::from).collect(),
        span: Some(SpanTarget {
            start: 0,
            end: 1,
            label: "NP".into(),
        }),
        field: None,
    };
    let rate = |texts: &[String]| {
        let got = label(texts);
        pos_rates(&got.iter().map(|g| (&target, g)).collect::<Vec<_>>())
    };
    let ((g_exact, g_words), (u_exact, u_words)) = (rate(&guided), rate(&unguided));
    assert!(
        g_words >= u_words + 0.2 && g_exact > u_exact,
        "guided {g_exact:.2} exact / {g_words:.2} per word vs unguided {u_exact:.2} / {u_words:.2}\n{guided:#?}\n{unguided:#?}"
    );
    // A verb phrase over words 3..9 of a 12-word text.
    let span_target = SyntaxTarget {
        span: Some(SpanTarget {
            start: 3,
            end: 9,
            label: "VP".into(),
        }),
        length: 12,
        ..target
    };
    let guided = texts(
        client
            .generate(request(n, 12, span(3, 9, "VP"), Some(12)))
            .await
            .unwrap()
            .into_inner(),
    );
    let unguided = texts(
        client
            .generate(request(n, 12, None, Some(12)))
            .await
            .unwrap()
            .into_inner(),
    );
    let rate = |texts: &[String]| {
        let got = label(texts);
        span_rate(&got.iter().map(|g| (&span_target, g)).collect::<Vec<_>>())
    };
    let (g, u) = (rate(&guided), rate(&unguided));
    assert!(
        g > u,
        "span present: guided {g:.2} vs unguided {u:.2}\n{guided:#?}\n{unguided:#?}"
    );
}
