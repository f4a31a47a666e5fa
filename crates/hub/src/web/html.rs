//! The page's HTML, rendered on the server. Every text that is not a literal of this file goes
//! through [`esc`] (element content and double-quoted attribute values alike) or, in a URL,
//! [`url_part`]: device-written strings (device ids, model ids, head and class names, sources)
//! and clinicians' labels are shown, never run. No script; one inline stylesheet, allowed by its
//! hash in the Content-Security-Policy.

use std::fmt::Write as _;

use dermedge_record::HeadResult;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use super::ListQuery;
use crate::heads::Evaluation;
use crate::store::{DeviceHealth, Label, RecordPage, RecordSummary, StoredHead};

/// The page's stylesheet (inline; its SHA-256 is in the Content-Security-Policy).
pub const CSS: &str = "
body{font:15px/1.4 system-ui,sans-serif;margin:0;color:#1c2430;background:#f6f7f9}
header{display:flex;gap:1.2em;align-items:center;padding:.6em 1.2em;background:#243b53;color:#fff}
header a{color:#fff}header nav{display:flex;gap:1em;flex:1}header a.active{font-weight:700}
header form{margin:0}main{padding:1em 1.2em;max-width:90em}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #d5dae1;padding:.3em .5em;text-align:left;vertical-align:top}
th{background:#eef1f5}img.thumb{max-width:96px;max-height:96px;display:block}
img.large{max-width:320px;max-height:320px;float:left;margin:0 1em 1em 0}
.ok{color:#1e6b3a}.bad{color:#a4262c}.muted{color:#5f6b7a}
form.filters{display:flex;flex-wrap:wrap;gap:.6em 1em;align-items:end;margin-bottom:1em}
form.filters label,form.label label{display:flex;flex-direction:column;font-size:.9em}
form.label{display:flex;gap:.6em;align-items:end;margin:.4em 0}
.message{padding:.5em .8em;background:#fff4ce;border:1px solid #e0c36a}
ul.plain{list-style:none;margin:0;padding:0}.login{max-width:22em;margin:4em auto}
.login form{display:flex;flex-direction:column;gap:.8em}.login label{display:flex;flex-direction:column}
.record-fields{overflow:hidden}section{clear:both;margin-top:1.2em}
form.train{display:flex;flex-wrap:wrap;gap:.6em 1em;align-items:end;margin-bottom:1em}
form.train label{display:flex;flex-direction:column;font-size:.9em}
section.head{background:#fff;border:1px solid #d5dae1;padding:.6em 1em}table.confusion td{text-align:right}
";

/// `text` fit for HTML element content and double-quoted attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Characters kept as they are in a path segment or query value: letters, digits, `-._~`.
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `text` percent-encoded for a URL path segment or query value (then escaped for HTML by the
/// caller where it goes into an attribute, as every URL here does).
pub fn url_part(text: &str) -> String {
    utf8_percent_encode(text, UNRESERVED).to_string()
}

/// The path of a record's page.
pub fn record_url(record_id: &str) -> String {
    format!("/records/{}", url_part(record_id))
}

/// Days since 1970-01-01 of a date in the proleptic Gregorian calendar.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

const DAY_MS: i64 = 86_400_000;

/// Midnight UTC of `YYYY-MM-DD` (years 1970 to 9999), in ms since the epoch.
pub fn parse_day(text: &str) -> Option<i64> {
    let mut parts = text.trim().splitn(3, '-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    let (y, m, d): (i64, u32, u32) = (y.parse().ok()?, m.parse().ok()?, d.parse().ok()?);
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let days = days_from_civil(y, m, d);
    // 31 February and the like come back as another date.
    (civil_from_days(days) == (y, m, d)).then_some(days * DAY_MS)
}

/// `YYYY-MM-DD` of a time in ms since the epoch (UTC).
pub fn day(ms: i64) -> String {
    let (y, m, d) = civil_from_days(ms.div_euclid(DAY_MS));
    format!("{y:04}-{m:02}-{d:02}")
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of a time in ms since the epoch.
pub fn time(ms: i64) -> String {
    let secs = ms.rem_euclid(DAY_MS) / 1000;
    format!(
        "{} {:02}:{:02}:{:02}",
        day(ms),
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// How long ago `ms` was, roughly ("3 min ago").
pub fn ago(ms: i64, now_ms: i64) -> String {
    let s = (now_ms - ms) / 1000;
    match s {
        s if s < 0 => "in the future (clock skew)".into(),
        s if s < 90 => format!("{s} s ago"),
        s if s < 90 * 60 => format!("{} min ago", s / 60),
        s if s < 48 * 3600 => format!("{} h ago", s / 3600),
        s => format!("{} days ago", s / 86_400),
    }
}

/// The signed-in clinician, for the header and its logout form.
pub struct Nav<'a> {
    pub user: &'a str,
    pub csrf: &'a str,
    /// The page's path, marked in the menu.
    pub active: &'a str,
}

/// A whole page: `main` (already HTML) under the header.
pub fn layout(title: &str, nav: Option<&Nav<'_>>, main: &str) -> String {
    let mut out = String::with_capacity(main.len() + 2048);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta name=\"referrer\" content=\"same-origin\">\
         <title>{} — dermedge hub</title><style>{CSS}</style></head><body>",
        esc(title)
    );
    if let Some(nav) = nav {
        let link = |path: &str, text: &str| {
            let class = if nav.active == path {
                " class=\"active\""
            } else {
                ""
            };
            format!("<a href=\"{path}\"{class}>{text}</a>")
        };
        let _ = write!(
            out,
            "<header><strong>dermedge hub</strong><nav>{}{}{}{}</nav>\
             <span class=\"user\">{}</span>\
             <form method=\"post\" action=\"/logout\">{}<button type=\"submit\" id=\"logout\">Log out</button></form>\
             </header>",
            link("/", "Records"),
            link("/devices", "Devices"),
            link("/heads", "Heads"),
            link("/export.csv", "Export CSV"),
            esc(nav.user),
            csrf_field(nav.csrf)
        );
    }
    let _ = writeln!(out, "<main>{main}</main></body></html>");
    out
}

fn csrf_field(csrf: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(csrf)
    )
}

fn message(text: Option<&str>) -> String {
    text.map_or(String::new(), |m| {
        format!("<p class=\"message\" role=\"alert\">{}</p>", esc(m))
    })
}

/// The sign-in form: nothing about the records.
pub fn login_page(note: Option<&str>, login_csrf: &str) -> String {
    let main = format!(
        "<div class=\"login\"><h1>dermedge hub</h1><p>Sign in to see the records.</p>{}\
         <form method=\"post\" action=\"/login\" id=\"login\">{}\
         <label>Name<input name=\"name\" id=\"name\" autocomplete=\"username\" required autofocus></label>\
         <label>Password<input type=\"password\" name=\"password\" id=\"password\" autocomplete=\"current-password\" required></label>\
         <button type=\"submit\" id=\"sign-in\">Sign in</button></form></div>",
        message(note),
        csrf_field(login_csrf)
    );
    layout("Sign in", None, &main)
}

/// A short page with one message (an error, a refusal).
pub fn message_page(nav: Option<&Nav<'_>>, title: &str, text: &str) -> String {
    let main = format!(
        "<h1>{}</h1>{}<p><a href=\"/\">Back to the records</a></p>",
        esc(title),
        message(Some(text))
    );
    layout(title, nav, &main)
}

fn options<'a>(
    out: &mut String,
    selected: Option<&str>,
    items: impl IntoIterator<Item = (&'a str, &'a str)>,
) {
    for (value, text) in items {
        let sel = if selected == Some(value) {
            " selected"
        } else {
            ""
        };
        let _ = write!(
            out,
            "<option value=\"{}\"{sel}>{}</option>",
            esc(value),
            esc(text)
        );
    }
}

fn quality_cell(record: &RecordSummary) -> String {
    match &record.quality {
        None => "<span class=\"muted\">no verdict</span>".into(),
        Some(q) if q.acceptable => "<span class=\"ok\">acceptable</span>".into(),
        Some(q) => format!(
            "<span class=\"bad\">not acceptable</span>{}",
            if q.reasons.is_empty() {
                String::new()
            } else {
                format!(": {}", esc(&q.reasons.join("; ")))
            }
        ),
    }
}

fn head_results(heads: &[HeadResult]) -> String {
    if heads.is_empty() {
        return "<span class=\"muted\">none</span>".into();
    }
    let mut out = String::from("<ul class=\"plain\">");
    for head in heads {
        let name = head.label();
        match crate::store::top_class(head) {
            Some((class, p)) => {
                let _ = write!(
                    out,
                    "<li>{}: <b>{}</b> {:.0}%</li>",
                    esc(&name),
                    esc(class),
                    p * 100.0
                );
            }
            None => {
                let _ = write!(out, "<li>{}: —</li>", esc(&name));
            }
        }
    }
    out.push_str("</ul>");
    out
}

fn label_list(labels: &[Label]) -> String {
    if labels.is_empty() {
        return "<span class=\"muted\">none</span>".into();
    }
    let mut out = String::from("<ul class=\"plain labels\">");
    for l in labels {
        let _ = write!(
            out,
            "<li class=\"label\">{}<b>{}</b> <span class=\"muted\">({})</span></li>",
            l.head
                .as_deref()
                .map_or(String::new(), |h| format!("{}: ", esc(h))),
            esc(&l.label),
            esc(&l.author)
        );
    }
    out.push_str("</ul>");
    out
}

fn thumbnail(record: &RecordSummary, class: &str) -> String {
    if record.has_thumbnail {
        format!(
            "<img class=\"{class}\" src=\"{}/thumbnail.jpg\" alt=\"thumbnail of record {}\">",
            esc(&record_url(&record.record_id)),
            esc(&record.record_id)
        )
    } else {
        "<span class=\"muted\">no image</span>".into()
    }
}

/// What the records page shows.
pub struct RecordsView<'a> {
    pub query: &'a ListQuery,
    pub page: &'a RecordPage,
    pub page_size: u32,
    pub devices: &'a [String],
    pub head_results: &'a [(String, String)],
}

/// The records, filters on top, one page at a time.
pub fn records_page(nav: &Nav<'_>, view: &RecordsView<'_>) -> String {
    let q = view.query;
    let mut main = String::from("<h1>Records</h1>");
    main.push_str(&message(q.problem.as_deref()));
    main.push_str("<form method=\"get\" action=\"/\" class=\"filters\" id=\"filters\">");
    main.push_str("<label>Device<select name=\"device\" id=\"device\">");
    options(
        &mut main,
        q.get("device"),
        std::iter::once(("", "all devices"))
            .chain(view.devices.iter().map(|d| (d.as_str(), d.as_str()))),
    );
    let _ = write!(
        main,
        "</select></label>\
         <label>Captured from<input type=\"date\" name=\"from\" value=\"{}\"></label>\
         <label>to<input type=\"date\" name=\"to\" value=\"{}\"></label>\
         <label>Label contains<input type=\"search\" name=\"label\" value=\"{}\"></label>\
         <label>Labelled<select name=\"labelled\">",
        esc(q.get("from").unwrap_or("")),
        esc(q.get("to").unwrap_or("")),
        esc(q.get("label").unwrap_or(""))
    );
    options(
        &mut main,
        q.get("labelled"),
        [("", "any"), ("yes", "labelled"), ("no", "unlabelled")],
    );
    main.push_str("</select></label><label>Head<select name=\"head\">");
    let mut heads: Vec<&str> = view.head_results.iter().map(|(h, _)| h.as_str()).collect();
    heads.dedup();
    options(
        &mut main,
        q.get("head"),
        std::iter::once(("", "any head")).chain(heads.iter().map(|h| (*h, *h))),
    );
    main.push_str("</select></label><label>Top class<select name=\"top\">");
    let mut classes: Vec<&str> = view.head_results.iter().map(|(_, c)| c.as_str()).collect();
    classes.sort_unstable();
    classes.dedup();
    options(
        &mut main,
        q.get("top"),
        std::iter::once(("", "any class")).chain(classes.iter().map(|c| (*c, *c))),
    );
    main.push_str(
        "</select></label><button type=\"submit\" id=\"apply\">Filter</button>\
         <a href=\"/\">Clear</a></form>",
    );
    let total = view.page.total;
    let pages = total.div_ceil(u64::from(view.page_size)).max(1);
    let _ = write!(
        main,
        "<p class=\"count\"><span id=\"total\">{total}</span> record{} · page {} of {pages} · \
         <a href=\"/export.csv{}\" id=\"export\">export these as CSV</a></p>",
        if total == 1 { "" } else { "s" },
        q.page,
        esc(&q.query_string(None))
    );
    if view.page.records.is_empty() {
        main.push_str("<p class=\"muted\">No record matches.</p>");
    } else {
        main.push_str(
            "<table class=\"records\" id=\"records\"><thead><tr><th>Image</th>\
             <th>Captured (UTC)</th><th>Device</th><th>Quality</th><th>Head results</th>\
             <th>Labels</th></tr></thead><tbody>",
        );
        for r in &view.page.records {
            let url = esc(&record_url(&r.record_id));
            let _ = write!(
                main,
                "<tr class=\"record\" data-record=\"{}\"><td><a href=\"{url}\">{}</a></td>\
                 <td><a href=\"{url}\">{}</a></td><td class=\"device\">{}</td><td>{}</td>\
                 <td>{}</td><td>{}</td></tr>",
                esc(&r.record_id),
                thumbnail(r, "thumb"),
                time(r.captured_at_ms),
                esc(&r.device_id),
                quality_cell(r),
                head_results(&r.heads),
                label_list(&r.labels)
            );
        }
        main.push_str("</tbody></table>");
    }
    if pages > 1 {
        main.push_str("<p class=\"pages\">");
        if q.page > 1 {
            let _ = write!(
                main,
                "<a href=\"/{}\" rel=\"prev\">← newer</a> ",
                esc(&q.query_string(Some(q.page - 1)))
            );
        }
        if q.page < pages {
            let _ = write!(
                main,
                "<a href=\"/{}\" rel=\"next\">older →</a>",
                esc(&q.query_string(Some(q.page + 1)))
            );
        }
        main.push_str("</p>");
    }
    layout("Records", Some(nav), &main)
}

/// One record: every field, its head results, its labels and the forms to label it.
pub fn record_page(
    nav: &Nav<'_>,
    record: &RecordSummary,
    history: &[Label],
    note: Option<&str>,
) -> String {
    let r = record;
    let url = esc(&record_url(&r.record_id));
    let mut main = format!(
        "<p><a href=\"/\">← Records</a></p><h1>Record <code>{}</code></h1>{}\
         <div class=\"record-fields\">{}<table class=\"fields\">",
        esc(&r.record_id),
        message(note),
        thumbnail(r, "large")
    );
    let rows: [(&str, String); 9] = [
        ("Captured (UTC)", esc(&time(r.captured_at_ms))),
        ("Device", esc(&r.device_id)),
        ("Position", format!("epoch {}, #{}", r.epoch, r.seq)),
        ("Model", esc(&r.model_id)),
        ("Precision", esc(&r.precision)),
        ("Embedding", format!("{} dimensions", r.embedding_dim)),
        ("Source", esc(r.source.as_deref().unwrap_or("—"))),
        ("Received (UTC)", esc(&time(r.received_at_ms))),
        ("Quality", quality_cell(r)),
    ];
    for (name, value) in rows {
        let _ = write!(main, "<tr><th>{name}</th><td>{value}</td></tr>");
    }
    main.push_str("</table></div>");
    if let Some(q) = r.quality.as_ref().filter(|q| !q.metrics.is_empty()) {
        main.push_str("<section><h2>Quality measures</h2><table><tbody>");
        for (name, value) in &q.metrics {
            let _ = write!(main, "<tr><th>{}</th><td>{value:.3}</td></tr>", esc(name));
        }
        main.push_str("</tbody></table></section>");
    }
    main.push_str("<section><h2>Head results</h2>");
    if r.heads.is_empty() {
        main.push_str("<p class=\"muted\">This record has no head results.</p>");
    }
    for head in &r.heads {
        let top = crate::store::top_class(head).map(|(c, _)| c);
        let _ = write!(
            main,
            "<h3>{}</h3><table class=\"head\"><thead><tr><th>Class</th><th>Probability</th></tr></thead><tbody>",
            esc(&head.head)
        );
        let mut classes: Vec<(&String, f32)> = head
            .classes
            .iter()
            .zip(head.probabilities.iter().copied())
            .collect();
        classes.sort_by(|a, b| b.1.total_cmp(&a.1));
        for (class, p) in classes {
            let (open, close) = if Some(class.as_str()) == top {
                ("<b>", "</b>")
            } else {
                ("", "")
            };
            let _ = write!(
                main,
                "<tr><td>{open}{}{close}</td><td>{:.1}%</td></tr>",
                esc(class),
                p * 100.0
            );
        }
        main.push_str("</tbody></table>");
    }
    main.push_str("</section><section id=\"labels\"><h2>Labels</h2>");
    let _ = write!(
        main,
        "<div id=\"current-labels\">{}</div>",
        label_list(&r.labels)
    );
    for head in &r.heads {
        let _ = write!(
            main,
            "<form method=\"post\" action=\"{url}/labels\" class=\"label head-label\" data-head=\"{}\">{}\
             <input type=\"hidden\" name=\"kind\" value=\"class\">\
             <input type=\"hidden\" name=\"head\" value=\"{}\">\
             <label>{} (from its classes)<select name=\"label\">",
            esc(&head.head),
            csrf_field(nav.csrf),
            esc(&head.head),
            esc(&head.head)
        );
        let current = r
            .labels
            .iter()
            .find(|l| l.head.as_deref() == Some(head.head.as_str()))
            .map(|l| l.label.as_str())
            .or_else(|| crate::store::top_class(head).map(|(c, _)| c));
        options(
            &mut main,
            current,
            head.classes.iter().map(|c| (c.as_str(), c.as_str())),
        );
        let _ = write!(
            main,
            "</select></label><button type=\"submit\">Set {} label</button></form>",
            esc(&head.head)
        );
    }
    let _ = write!(
        main,
        "<form method=\"post\" action=\"{url}/labels\" class=\"label\" id=\"free-label\">{}\
         <input type=\"hidden\" name=\"kind\" value=\"text\">\
         <label>For<select name=\"head\">",
        csrf_field(nav.csrf)
    );
    options(
        &mut main,
        None,
        std::iter::once(("", "the whole record"))
            .chain(r.heads.iter().map(|h| (h.head.as_str(), h.head.as_str()))),
    );
    let _ = write!(
        main,
        "</select></label><label>Label (free text)<input name=\"label\" maxlength=\"{}\" required></label>\
         <button type=\"submit\">Add label</button></form>",
        super::MAX_LABEL_CHARS
    );
    if !history.is_empty() {
        main.push_str(
            "<h3>History</h3><table class=\"history\"><thead><tr><th>When (UTC)</th><th>For</th>\
             <th>Label</th><th>By</th></tr></thead><tbody>",
        );
        for l in history.iter().rev() {
            let _ = write!(
                main,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&time(l.at_ms)),
                esc(l.head.as_deref().unwrap_or("whole record")),
                esc(&l.label),
                esc(&l.author)
            );
        }
        main.push_str("</tbody></table>");
    }
    main.push_str("</section>");
    layout(&format!("Record {}", r.record_id), Some(nav), &main)
}

/// Each device's sync as the hub knows it.
pub fn devices_page(nav: &Nav<'_>, devices: &[DeviceHealth], now_ms: i64) -> String {
    let mut main = String::from(
        "<h1>Devices</h1><p class=\"muted\">What the hub knows of each device's sync. \
         <em>Acknowledged through</em> is how far the hub has taken the device's sequence \
         (records and reported losses); <em>still queued</em> is what the device said it held \
         besides its last batch, when it sent it.</p>",
    );
    if devices.is_empty() {
        main.push_str("<p class=\"muted\">No device is enrolled.</p>");
        return layout("Devices", Some(nav), &main);
    }
    main.push_str(
        "<table id=\"devices\"><thead><tr><th>Device</th><th>Status</th><th>Last sync (UTC)</th>\
         <th>Acknowledged through</th><th>Still queued</th><th>Highest record</th><th>Records stored</th>\
         <th>Latest capture (UTC)</th><th>Losses</th><th>Refused requests (24 h)</th></tr></thead><tbody>",
    );
    for d in devices {
        let status = if d.revoked {
            "<span class=\"bad\">revoked</span>"
        } else if d.needs_enrollment {
            "<span class=\"bad\">must be enrolled again</span>"
        } else {
            "<span class=\"ok\">enrolled</span>"
        };
        let last_sync = d.last_batch_at_ms.map_or("never".to_string(), |at| {
            format!(
                "{} <span class=\"muted\">({})</span>",
                esc(&time(at)),
                esc(&ago(at, now_ms))
            )
        });
        let losses = if d.gaps.is_empty() {
            "<span class=\"muted\">none</span>".to_string()
        } else {
            let mut out = String::from("<ul class=\"plain\">");
            for g in &d.gaps {
                let _ = write!(
                    out,
                    "<li class=\"gap\">{}: {} record{} in {} range{}</li>",
                    esc(&g.reason),
                    g.records,
                    if g.records == 1 { "" } else { "s" },
                    g.ranges,
                    if g.ranges == 1 { "" } else { "s" }
                );
            }
            out.push_str("</ul>");
            out
        };
        let _ = write!(
            main,
            "<tr class=\"device\" data-device=\"{}\"><td>{}</td><td>{status}</td><td>{last_sync}</td>\
             <td>{} <span class=\"muted\">(epoch {})</span></td><td class=\"queued\">{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{losses}</td><td>{}</td></tr>",
            esc(&d.device_id),
            esc(&d.device_id),
            d.acked_through,
            d.epoch,
            d.queue_depth.map_or("—".to_string(), |n| n.to_string()),
            d.highest_record_seq
                .map_or("—".to_string(), |s| s.to_string()),
            d.records,
            d.last_captured_at_ms
                .map_or("—".to_string(), |at| esc(&time(at))),
            d.recent_rejections
        );
    }
    main.push_str("</tbody></table>");
    layout("Devices", Some(nav), &main)
}

/// What the heads page shows.
pub struct HeadsView<'a> {
    pub heads: &'a [StoredHead],
    /// `(model id, label set, labelled records)`: what a head can be trained from.
    pub label_sets: &'a [(String, Option<String>, u64)],
    pub message: Option<&'a str>,
}

fn label_set_name(set: Option<&str>) -> String {
    set.map_or("labels of whole records".into(), |h| {
        format!("labels of head {h}")
    })
}

fn percent(v: Option<f64>) -> String {
    v.map_or("—".into(), |v| format!("{:.1}%", v * 100.0))
}

fn auc(v: Option<f64>) -> String {
    v.map_or("—".into(), |v| format!("{v:.3}"))
}

/// One head's held-out scores: per class, then the confusion matrix.
fn evaluation_tables(out: &mut String, e: &Evaluation) {
    let h = &e.heldout;
    let _ = write!(
        out,
        "<p>Held out: <b>{}</b> records, accuracy <b class=\"accuracy\">{}</b>, macro ROC AUC {}.</p>\
         <table class=\"classes\"><thead><tr><th>Class</th><th>Trained on</th><th>Held out</th>\
         <th>ROC AUC</th><th>Precision</th><th>Recall</th></tr></thead><tbody>",
        h.count,
        percent(Some(h.accuracy)),
        auc(h.macro_roc_auc)
    );
    for (i, c) in h.classes.iter().enumerate() {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"auc\">{}</td><td>{}</td><td>{}</td></tr>",
            esc(&c.class),
            e.train_counts.get(i).copied().unwrap_or(0),
            e.heldout_counts.get(i).copied().unwrap_or(0),
            auc(c.roc_auc),
            percent(c.precision),
            percent(c.recall)
        );
    }
    out.push_str("</tbody></table>");
    if let Some(confusion) = &h.confusion {
        out.push_str(
            "<p>Confusion on the held-out records (rows: the clinicians' label, columns: the head's top class).</p>\
             <table class=\"confusion\"><thead><tr><th></th>",
        );
        for c in &e.classes {
            let _ = write!(out, "<th>{}</th>", esc(c));
        }
        out.push_str("</tr></thead><tbody>");
        for (i, row) in confusion.iter().enumerate() {
            let _ = write!(
                out,
                "<tr><th>{}</th>",
                esc(e.classes.get(i).map_or("", String::as_str))
            );
            for n in row {
                let _ = write!(out, "<td>{n}</td>");
            }
            out.push_str("</tr>");
        }
        out.push_str("</tbody></table>");
    }
    if !e.left_out.is_empty() {
        let left: Vec<String> = e
            .left_out
            .iter()
            .map(|(label, n)| format!("{} ({n})", esc(label)))
            .collect();
        let _ = write!(
            out,
            "<p class=\"muted\">Left out, too few labelled records: {}.</p>",
            left.join(", ")
        );
    }
}

/// Heads trained from the clinicians' labels, each with its held-out scores, and the form that
/// trains another.
pub fn heads_page(nav: &Nav<'_>, view: &HeadsView<'_>) -> String {
    let mut main = String::from(
        "<h1>Heads</h1><p class=\"muted\">A head is trained from one set of labels on the records \
         of one model, and scored on a quarter of each class's records it did not see. Publishing \
         signs it with the hub's key; devices fetch it on their next sync and use it from the next \
         capture.</p>",
    );
    main.push_str(&message(view.message));
    if view.label_sets.is_empty() {
        main.push_str(
            "<p class=\"muted\">No record is labelled yet: label records to train a head.</p>",
        );
    } else {
        let _ = write!(
            main,
            "<form method=\"post\" action=\"/heads\" class=\"train\" id=\"train\">{}\
             <label>Labels<select name=\"label_set\" id=\"label-set\">",
            csrf_field(nav.csrf)
        );
        for (model, set, n) in view.label_sets {
            let value = serde_json::to_string(&(model, set)).expect("serialisable");
            let _ = write!(
                main,
                "<option value=\"{}\">{}: {} ({n} records)</option>",
                esc(&value),
                esc(model),
                esc(&label_set_name(set.as_deref()))
            );
        }
        let _ = write!(
            main,
            "</select></label><label>Head name<input name=\"name\" id=\"head-name\" required \
             maxlength=\"{}\" value=\"diagnosis\"></label>\
             <button type=\"submit\" id=\"train-head\">Train</button></form>",
            dermedge_head::MAX_NAME_CHARS
        );
    }
    if view.heads.is_empty() {
        main.push_str("<p class=\"muted\">No head has been trained.</p>");
    }
    for head in view.heads {
        let status = match (head.version, head.published_at_ms) {
            (Some(v), Some(at)) => format!(
                "<span class=\"ok published\">published as version {v}</span> {} by {}",
                esc(&time(at)),
                esc(head.published_by.as_deref().unwrap_or("?"))
            ),
            _ => format!(
                "<span class=\"muted\">draft</span> <form method=\"post\" action=\"/heads/{}/publish\" \
                 class=\"publish\">{}<button type=\"submit\" id=\"publish-{}\">Publish to devices</button></form>",
                head.id,
                csrf_field(nav.csrf),
                head.id
            ),
        };
        let _ = write!(
            main,
            "<section class=\"head\" id=\"head-{}\"><h2>{} <span class=\"muted\">for {} \
             ({}-d)</span></h2><p>{status}</p><p class=\"muted\">Trained {} by {} from {}: {} records \
             to train, {} held out.</p>",
            head.id,
            esc(&head.name),
            esc(&head.model_id),
            head.embedding_dim,
            esc(&time(head.trained_at_ms)),
            esc(&head.trained_by),
            esc(&label_set_name(head.label_set.as_deref())),
            head.train_records,
            head.heldout_records
        );
        if head.heldout_records < crate::heads::MIN_HELDOUT_TO_JUDGE {
            let _ = write!(
                main,
                "<p class=\"bad few\">Only {} held-out records: too few to judge this head by. \
                 Label more records before publishing it.</p>",
                head.heldout_records
            );
        }
        match crate::heads::evaluation(head) {
            Some(e) => evaluation_tables(&mut main, &e),
            None => main.push_str("<p class=\"bad\">The stored evaluation cannot be read.</p>"),
        }
        main.push_str("</section>");
    }
    layout("Heads", Some(nav), &main)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_and_both_quotes() {
        assert_eq!(
            esc(r#"<script>alert("x")</script> & 'y'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
        assert_eq!(esc("plain text é"), "plain text é");
        assert_eq!(url_part("a b/c?d&e=f#g"), "a%20b%2Fc%3Fd%26e%3Df%23g");
        assert_eq!(url_part("0f-a_b.c~"), "0f-a_b.c~");
    }

    #[test]
    fn days_and_times_are_utc_calendar_dates() {
        assert_eq!(parse_day("1970-01-01"), Some(0));
        assert_eq!(parse_day("2026-09-21"), Some(1_789_948_800_000));
        assert_eq!(parse_day("2024-02-29"), Some(1_709_164_800_000));
        for bad in [
            "2023-02-29",
            "2026-13-01",
            "2026-9-21",
            "1969-12-31",
            "x",
            "",
            "2026-09-21x",
        ] {
            assert_eq!(parse_day(bad), None, "{bad}");
        }
        assert_eq!(day(1_789_948_800_000), "2026-09-21");
        assert_eq!(time(1_789_948_800_000 + 3_723_000), "2026-09-21 01:02:03");
        assert_eq!(time(0), "1970-01-01 00:00:00");
        for days in [-1000_i64, 0, 59, 365, 10_957, 20_000, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(ago(0, 120_000), "2 min ago");
    }

    #[test]
    fn the_login_page_has_a_form_and_nothing_else() {
        let page = login_page(Some("<b>wrong</b>"), "tok\"en");
        assert!(page.contains("action=\"/login\""));
        assert!(page.contains("value=\"tok&quot;en\""));
        assert!(page.contains("&lt;b&gt;wrong&lt;/b&gt;"));
        assert!(!page.contains("/logout"));
        assert!(!page.contains("<script"));
    }
}
