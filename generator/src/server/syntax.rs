//! Syntax targets of a request (`GenerateRequest.syntax`) → controls of the guides that read them:
//! a tag per word goes to the guide reading fields `pos.0`, `pos.1`, …; each span to the guide reading
//! `span.start`, `span.end` and `span.label`. Routing is the registry's, by field, as for any control.

use std::sync::Arc;

use dlm_proto::dlm::v1 as pb;
use dlm_proto::guide_contract::clip;

use crate::engine::Control;
use crate::guidance::{GuideRegistry, RegisteredGuide};
use crate::{Error, Result};

/// Where a tag sequence or a span is steered to: the guides' field names.
const POS_FIELD: &str = "pos";
const SPAN_FIELDS: [&str; 3] = ["span.start", "span.end", "span.label"];

/// The controls for `syntax`, and the length the request then has: a tag sequence fixes it (a
/// `length` given beside it must agree). `max_words` is the canvas's room for words.
pub fn syntax_controls(
    guides: &GuideRegistry,
    syntax: &pb::Syntax,
    length: Option<usize>,
    max_words: usize,
) -> Result<(Vec<Control>, Option<usize>)> {
    let weight = super::control_weight("syntax.weight", syntax.weight)?;
    let mut controls = Vec::new();
    let mut length = length;
    if !syntax.pos.is_empty() {
        let tags = syntax.pos.len();
        if tags > max_words {
            return Err(Error::invalid(
                "syntax.pos",
                format!("has {tags} tags; at most {max_words} words fit"),
            ));
        }
        if let Some(k) = length.filter(|&k| k != tags) {
            return Err(Error::invalid(
                "syntax.pos",
                format!("has {tags} tags but length is {k}"),
            ));
        }
        length = Some(tags);
        let guide = reader(guides, "syntax.pos", &format!("{POS_FIELD}.0"))?;
        let mut specs = Vec::new();
        for (i, tag) in syntax.pos.iter().enumerate() {
            let tag = tag.trim();
            if tag.is_empty() || tag == "_" {
                continue;
            }
            let field = format!("{POS_FIELD}.{i}");
            let known = guide.values(&field).unwrap_or(&[]);
            if !known.iter().any(|v| v == tag) {
                return Err(Error::invalid(
                    "syntax.pos",
                    format!(
                        "`{}` (word {i}) is not a tag guide `{}` knows (tags: {})",
                        clip(tag, 16),
                        guide.name,
                        known.join(" ")
                    ),
                ));
            }
            specs.push(format!("{field}={tag}"));
        }
        if !specs.is_empty() {
            controls.push(Control {
                targets: guide.targets(&specs)?,
                guide,
                weight,
            });
        }
    }
    let words = length.unwrap_or(max_words);
    for (i, span) in syntax.spans.iter().enumerate() {
        let (start, end) = (span.start as usize, span.end as usize);
        if start > end || end >= words {
            let bound = if length.is_some() {
                format!("the length, {words} words")
            } else {
                format!("the canvas, {words} words")
            };
            return Err(Error::invalid(
                "syntax.spans",
                format!("spans[{i}] = {start}..{end} must have start ≤ end < {bound}"),
            ));
        }
        let guide = reader(guides, "syntax.spans", SPAN_FIELDS[2])?;
        let label = span.label.trim();
        let labels = guide.values(SPAN_FIELDS[2]).unwrap_or(&[]);
        if !labels.iter().any(|v| v.eq_ignore_ascii_case(label)) {
            return Err(Error::invalid(
                "syntax.spans",
                format!(
                    "spans[{i}].label `{}` is not a label guide `{}` knows (labels: {})",
                    clip(label, 16),
                    guide.name,
                    labels.join(" ")
                ),
            ));
        }
        let specs = [
            format!("{}={start}", SPAN_FIELDS[0]),
            format!("{}={end}", SPAN_FIELDS[1]),
            format!("{}={label}", SPAN_FIELDS[2]),
        ];
        controls.push(Control {
            targets: guide.targets(&specs)?,
            guide,
            weight,
        });
    }
    Ok((controls, length))
}

/// The registered guide that reads `field`, or INVALID_ARGUMENT naming the request's `what`.
fn reader(guides: &GuideRegistry, what: &'static str, field: &str) -> Result<Arc<RegisteredGuide>> {
    match guides.route(&[format!("{field}=_")]) {
        Ok(routed) => Ok(Arc::clone(&routed[0].0)),
        Err(Error::InvalidArgument { message, .. }) => Err(Error::invalid(what, message)),
        Err(e) => Err(e),
    }
}
