//! Screen layouts, computed from the target's size.

use embedded_graphics::mono_font::ascii::{
    FONT_10X20, FONT_6X10, FONT_7X13, FONT_7X13_BOLD, FONT_9X15, FONT_9X15_BOLD,
};
use embedded_graphics::mono_font::{MonoFont, MonoTextStyle};
use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::*;
use embedded_graphics::primitives::{PrimitiveStyle, Rectangle};
use embedded_graphics::text::{Baseline, Text};
use image::RgbImage;

use crate::{HeadView, Screen, Status, SyncView, NOT_A_DIAGNOSIS};

const BACKGROUND: Rgb888 = Rgb888::new(0, 0, 0);
const BAR: Rgb888 = Rgb888::new(40, 44, 52);
const TEXT: Rgb888 = Rgb888::new(235, 235, 235);
const MUTED: Rgb888 = Rgb888::new(150, 150, 150);
const ACCENT: Rgb888 = Rgb888::new(0, 170, 160);
const TRACK: Rgb888 = Rgb888::new(50, 60, 60);
const WARNING: Rgb888 = Rgb888::new(255, 176, 0);
const ERROR: Rgb888 = Rgb888::new(220, 50, 50);

/// Fonts and spacing for one display size.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub width: u32,
    pub height: u32,
    pub small: &'static MonoFont<'static>,
    pub large: &'static MonoFont<'static>,
    pub margin: u32,
}

impl Layout {
    pub fn for_size(size: Size) -> Self {
        let (small, large, margin) = if size.width >= 640 && size.height >= 400 {
            (&FONT_9X15, &FONT_10X20, 12)
        } else if size.width >= 300 {
            (&FONT_7X13, &FONT_9X15_BOLD, 6)
        } else {
            (&FONT_6X10, &FONT_7X13_BOLD, 4)
        };
        Self {
            width: size.width,
            height: size.height,
            small,
            large,
            margin,
        }
    }

    fn advance(font: &MonoFont) -> u32 {
        font.character_size.width + font.character_spacing
    }

    /// How many characters of `font` fit in `pixels`.
    fn chars(font: &MonoFont, pixels: u32) -> usize {
        (pixels / Self::advance(font)) as usize
    }

    fn line(font: &MonoFont) -> u32 {
        font.character_size.height + 3
    }

    fn inner_width(&self) -> u32 {
        self.width.saturating_sub(2 * self.margin)
    }
}

/// Printable ASCII only (the fonts have nothing else); others become `?`.
fn ascii(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii() && !c.is_ascii_control() {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// Shorten to `max` characters, marking the cut with `..`.
pub(crate) fn fit(text: &str, max: usize) -> String {
    let text = ascii(text);
    let n = text.chars().count();
    if n <= max {
        return text;
    }
    if max < 3 {
        return text.chars().take(max).collect();
    }
    let mut out: String = text.chars().take(max - 2).collect();
    out.push_str("..");
    out
}

/// Word-wrap into at most `max_lines` lines of `width` characters; the last line says `..` if
/// text was left out.
pub(crate) fn wrap(text: &str, width: usize, max_lines: usize) -> Vec<String> {
    if width == 0 || max_lines == 0 {
        return Vec::new();
    }
    let mut lines: Vec<String> = Vec::new();
    let mut current = String::new();
    for word in ascii(text).split_whitespace() {
        let mut word = word.to_string();
        loop {
            let sep = usize::from(!current.is_empty());
            if current.len() + sep + word.len() <= width {
                if sep == 1 {
                    current.push(' ');
                }
                current.push_str(&word);
                break;
            }
            if current.is_empty() {
                // A word longer than the line: break it.
                let rest = word.split_off(width);
                lines.push(word);
                word = rest;
                if word.is_empty() {
                    break;
                }
            } else {
                lines.push(std::mem::take(&mut current));
            }
        }
    }
    if !current.is_empty() {
        lines.push(current);
    }
    if lines.len() > max_lines {
        let rest = lines.split_off(max_lines - 1).join(" ");
        let mut last = fit(&rest, width);
        if !last.ends_with("..") {
            last = fit(&format!("{rest} ...."), width);
        }
        lines.push(last);
    }
    lines
}

struct Painter<'a, D> {
    target: &'a mut D,
    layout: Layout,
}

impl<D, C> Painter<'_, D>
where
    D: DrawTarget<Color = C>,
    C: PixelColor + From<Rgb888>,
{
    fn fill(&mut self, x: i32, y: i32, w: u32, h: u32, color: Rgb888) -> Result<(), D::Error> {
        Rectangle::new(Point::new(x, y), Size::new(w, h))
            .into_styled(PrimitiveStyle::with_fill(C::from(color)))
            .draw(self.target)
    }

    fn text(
        &mut self,
        text: &str,
        x: i32,
        y: i32,
        font: &MonoFont,
        color: Rgb888,
    ) -> Result<(), D::Error> {
        let style = MonoTextStyle::new(font, C::from(color));
        Text::with_baseline(text, Point::new(x, y), style, Baseline::Top)
            .draw(self.target)
            .map(|_| ())
    }

    /// A screen title in the large font, shortened to the width.
    fn title(&mut self, text: &str, y: u32, color: Rgb888) -> Result<(), D::Error> {
        let l = self.layout;
        let max = Layout::chars(l.large, l.inner_width());
        self.text(&fit(text, max), l.margin as i32, y as i32, l.large, color)
    }

    /// Nearest-neighbour scale of `image` into the box, keeping its aspect ratio, centred.
    fn image(&mut self, image: &RgbImage, x: i32, y: i32, w: u32, h: u32) -> Result<(), D::Error> {
        let (iw, ih) = image.dimensions();
        if iw == 0 || ih == 0 || w == 0 || h == 0 {
            return Ok(());
        }
        let scale = (w as f32 / iw as f32).min(h as f32 / ih as f32);
        let (dw, dh) = (
            ((iw as f32 * scale) as u32).clamp(1, w),
            ((ih as f32 * scale) as u32).clamp(1, h),
        );
        let (ox, oy) = (x + ((w - dw) / 2) as i32, y + ((h - dh) / 2) as i32);
        let colors = (0..dh).flat_map(move |py| {
            (0..dw).map(move |px| {
                let sx = (px as u64 * iw as u64 / dw as u64) as u32;
                let sy = (py as u64 * ih as u64 / dh as u64) as u32;
                let p = image.get_pixel(sx, sy).0;
                C::from(Rgb888::new(p[0], p[1], p[2]))
            })
        });
        self.target.fill_contiguous(
            &Rectangle::new(Point::new(ox, oy), Size::new(dw, dh)),
            colors,
        )
    }

    /// The status bar; returns its height.
    fn status_bar(&mut self, status: &Status) -> Result<u32, D::Error> {
        let l = self.layout;
        let h = Layout::line(l.small) + 2;
        self.fill(0, 0, l.width, h, BAR)?;
        let sync = match &status.sync {
            SyncView::Disabled => "sync off".to_string(),
            SyncView::Waiting => "sync waiting".to_string(),
            SyncView::Synced { seconds_ago } => format!("synced {}", ago(*seconds_ago)),
            SyncView::Offline { .. } => "offline".to_string(),
        };
        let parts = [
            format!("queue {}", status.queue_depth),
            sync,
            format!("#{}", status.captures),
            status.device.clone(),
        ];
        let max = Layout::chars(l.small, l.inner_width());
        let mut line = String::new();
        for part in parts {
            let candidate = if line.is_empty() {
                part.clone()
            } else {
                format!("{line}  {part}")
            };
            if candidate.len() > max {
                break;
            }
            line = candidate;
        }
        let color = if matches!(status.sync, SyncView::Offline { .. }) {
            WARNING
        } else {
            TEXT
        };
        self.text(&fit(&line, max), l.margin as i32, 2, l.small, color)?;
        Ok(h)
    }

    /// Wrapped lines from `y`; returns the y after them.
    fn paragraph(
        &mut self,
        text: &str,
        y: u32,
        font: &MonoFont,
        color: Rgb888,
        max_lines: usize,
    ) -> Result<u32, D::Error> {
        self.paragraph_in(text, y, self.layout.inner_width(), font, color, max_lines)
    }

    fn paragraph_in(
        &mut self,
        text: &str,
        y: u32,
        width: u32,
        font: &MonoFont,
        color: Rgb888,
        max_lines: usize,
    ) -> Result<u32, D::Error> {
        let l = self.layout;
        let mut y = y;
        for line in wrap(text, Layout::chars(font, width), max_lines) {
            self.text(&line, l.margin as i32, y as i32, font, color)?;
            y += Layout::line(font);
        }
        Ok(y)
    }

    fn footer_lines(&self) -> Vec<String> {
        wrap(
            NOT_A_DIAGNOSIS,
            Layout::chars(self.layout.small, self.layout.inner_width()),
            3,
        )
    }

    fn result(&mut self, heads: &[HeadView], record: &str, top: u32) -> Result<(), D::Error> {
        let l = self.layout;
        let footer = self.footer_lines();
        let row = Layout::line(l.small) + 1;
        let footer_top = l
            .height
            .saturating_sub(footer.len() as u32 * Layout::line(l.small) + l.margin / 2);
        self.fill(
            0,
            footer_top as i32 - 2,
            l.width,
            l.height - footer_top + 2,
            BAR,
        )?;
        for (i, line) in footer.iter().enumerate() {
            self.text(
                line,
                l.margin as i32,
                (footer_top + i as u32 * Layout::line(l.small)) as i32,
                l.small,
                WARNING,
            )?;
        }
        let mut y = top + l.margin / 2;
        if heads.is_empty() {
            let text = format!("Saved. Record {} is queued for the hub.", fit(record, 8));
            self.paragraph(&text, y, l.small, TEXT, 4)?;
            return Ok(());
        }
        let title = Layout::line(l.large);
        let available = footer_top.saturating_sub(y + 2);
        // Rows left after every head's title; shared in order, at least one row per head.
        let mut rows_left = (available.saturating_sub(title * heads.len() as u32) / row) as usize;
        let label_chars = Layout::chars(l.small, l.inner_width() * 45 / 100).max(4);
        let label_px = label_chars as u32 * Layout::advance(l.small);
        let pct_px = 5 * Layout::advance(l.small);
        let bar_x = l.margin + label_px + 4;
        let bar_w = l.width.saturating_sub(bar_x + pct_px + l.margin);
        for (h, head) in heads.iter().enumerate() {
            if y + title > footer_top {
                break;
            }
            let max = Layout::chars(l.large, l.inner_width());
            self.text(
                &fit(&head.name, max),
                l.margin as i32,
                y as i32,
                l.large,
                ACCENT,
            )?;
            y += title;
            let heads_after = heads.len() - h - 1;
            let budget = rows_left.saturating_sub(heads_after).max(1);
            let n = head.classes.len();
            // When the classes do not fit, the last row says how many were left out.
            let (shown, more) = match n {
                n if n <= budget => (n, 0),
                n if budget >= 2 => (budget - 1, n - (budget - 1)),
                _ => (1, 0),
            };
            for (class, p) in head.classes.iter().take(shown) {
                self.text(
                    &fit(class, label_chars),
                    l.margin as i32,
                    y as i32,
                    l.small,
                    TEXT,
                )?;
                let bar_h = l.small.character_size.height.saturating_sub(2).max(2);
                self.fill(bar_x as i32, y as i32 + 1, bar_w, bar_h, TRACK)?;
                let filled = (bar_w as f32 * p.clamp(0.0, 1.0)).round() as u32;
                if filled > 0 {
                    self.fill(bar_x as i32, y as i32 + 1, filled, bar_h, ACCENT)?;
                }
                let pct = format!("{:>4}%", (p.clamp(0.0, 1.0) * 100.0).round() as u32);
                self.text(
                    &pct,
                    (l.width - l.margin - pct_px) as i32,
                    y as i32,
                    l.small,
                    TEXT,
                )?;
                y += row;
            }
            if more > 0 {
                self.text(
                    &format!("+{more} more"),
                    l.margin as i32,
                    y as i32,
                    l.small,
                    MUTED,
                )?;
                y += row;
            }
            rows_left = rows_left.saturating_sub(shown + usize::from(more > 0));
        }
        Ok(())
    }
}

fn ago(seconds: u64) -> String {
    match seconds {
        s if s < 60 => format!("{s}s ago"),
        s if s < 3600 => format!("{}m ago", s / 60),
        s if s < 86_400 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86_400),
    }
}

/// Draw `screen` with `status` onto `target`, laid out for its size.
pub fn draw<D, C>(target: &mut D, screen: &Screen, status: &Status) -> Result<(), D::Error>
where
    D: DrawTarget<Color = C>,
    C: PixelColor + From<Rgb888>,
{
    let layout = Layout::for_size(target.bounding_box().size);
    let mut p = Painter { target, layout };
    let l = layout;
    p.fill(0, 0, l.width, l.height, BACKGROUND)?;
    let top = p.status_bar(status)?;
    let body_h = l.height.saturating_sub(top);
    match screen {
        Screen::Preview { frame, hint } => {
            let hint_h = Layout::line(l.small) + 4;
            p.image(frame, 0, top as i32, l.width, body_h.saturating_sub(hint_h))?;
            let y = l.height.saturating_sub(hint_h);
            p.fill(0, y as i32, l.width, hint_h, BAR)?;
            let max = Layout::chars(l.small, l.inner_width());
            p.text(
                &fit(hint, max),
                l.margin as i32,
                y as i32 + 2,
                l.small,
                TEXT,
            )?;
        }
        Screen::QualityWarning { frame, reasons } => {
            let mut y = top + l.margin;
            p.title("Photo not accepted", y, WARNING)?;
            y += Layout::line(l.large) + l.margin / 2;
            let footer_h = Layout::line(l.small) + l.margin;
            let text_bottom = l.height.saturating_sub(footer_h);
            let mut text_width = l.inner_width();
            if let (Some(frame), true) = (frame, l.height >= 400) {
                // Large screens show what was refused beside the reasons.
                let thumb = (l.width / 3).min(text_bottom.saturating_sub(y));
                p.image(
                    frame,
                    (l.width - l.margin - thumb) as i32,
                    y as i32,
                    thumb,
                    thumb,
                )?;
                text_width = text_width.saturating_sub(thumb + l.margin);
            }
            let line = Layout::line(l.small);
            for reason in reasons.iter() {
                let lines_left = (text_bottom.saturating_sub(y) / line) as usize;
                if lines_left == 0 {
                    break;
                }
                y = p.paragraph_in(
                    &format!("- {reason}"),
                    y,
                    text_width,
                    l.small,
                    TEXT,
                    lines_left,
                )?;
            }
            p.text(
                &fit("Retake the photo.", Layout::chars(l.small, l.inner_width())),
                l.margin as i32,
                l.height.saturating_sub(footer_h) as i32,
                l.small,
                MUTED,
            )?;
        }
        Screen::Result { heads, record } => p.result(heads, record, top)?,
        Screen::Status { details } => {
            let mut y = top + l.margin;
            let line = Layout::line(l.small);
            p.title("Status", y, ACCENT)?;
            y += Layout::line(l.large);
            let status_lines = [
                format!("Queue: {} records wait for the hub", status.queue_depth),
                match &status.sync {
                    SyncView::Disabled => "Sync: off".to_string(),
                    SyncView::Waiting => "Sync: not yet".to_string(),
                    SyncView::Synced { seconds_ago } => format!("Sync: last {}", ago(*seconds_ago)),
                    SyncView::Offline { reason } => format!("Sync: offline ({reason})"),
                },
                format!("Captures this session: {}", status.captures),
            ];
            for text in status_lines.iter().chain(details.iter()) {
                let lines_left = (l.height.saturating_sub(y + l.margin) / line) as usize;
                if lines_left == 0 {
                    break;
                }
                y = p.paragraph(text, y, l.small, TEXT, lines_left.min(3))?;
            }
        }
        Screen::Error { title, message } => {
            let title_h = Layout::line(l.large) + l.margin;
            p.fill(0, top as i32, l.width, title_h, ERROR)?;
            let max = Layout::chars(l.large, l.inner_width());
            p.text(
                &fit(title, max),
                l.margin as i32,
                (top + l.margin / 2) as i32,
                l.large,
                TEXT,
            )?;
            let y = top + title_h + l.margin / 2;
            let lines_left =
                (l.height.saturating_sub(y + l.margin) / Layout::line(l.small)) as usize;
            p.paragraph(message, y, l.small, TEXT, lines_left)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fitting_cuts_at_characters_and_marks_the_cut() {
        assert_eq!(fit("melanoma", 20), "melanoma");
        assert_eq!(fit("seborrhoeic keratosis", 10), "seborrho..");
        assert_eq!(fit("naevus", 2), "na");
        assert_eq!(fit("café", 10), "caf?");
    }

    #[test]
    fn wrapping_respects_width_and_line_budget() {
        let lines = wrap("too dark: add light or move closer", 12, 5);
        assert!(lines.iter().all(|l| l.len() <= 12), "{lines:?}");
        assert_eq!(lines.join(" "), "too dark: add light or move closer");
        let cut = wrap("one two three four five six seven", 9, 2);
        assert_eq!(cut.len(), 2);
        assert!(cut[1].ends_with(".."), "{cut:?}");
        let long = wrap("abcdefghijklmnopqrstuvwxyz", 10, 5);
        assert_eq!(long, ["abcdefghij", "klmnopqrst", "uvwxyz"]);
    }
}
