//! Renders a scene to an RGB image with imageproc: a dark background with mild noise, each
//! object drawn in its cell with a small random jitter. Two renderings of one scene differ
//! only in jitter and noise (the image rephrase of M-Generality).

use image::{Rgb, RgbImage};
use imageproc::drawing::{draw_filled_circle_mut, draw_filled_rect_mut, draw_polygon_mut};
use imageproc::point::Point;
use imageproc::rect::Rect;
use rand::Rng;

use super::scene::{Object, Scene, Shape, Size};

const BACKGROUND: u8 = 32;
const NOISE: i16 = 12;

pub fn render(scene: &Scene, size: u32, rng: &mut impl Rng) -> RgbImage {
    let mut image = RgbImage::from_fn(size, size, |_, _| {
        let v = (BACKGROUND as i16 + rng.random_range(-NOISE..=NOISE)).clamp(0, 255) as u8;
        Rgb([v, v, v])
    });
    let cell = size as f32 / 3.0;
    for object in &scene.objects {
        let jitter = 0.1 * cell;
        let cx = (object.cell.col() as f32 + 0.5) * cell + rng.random_range(-jitter..=jitter);
        let cy = (object.cell.row() as f32 + 0.5) * cell + rng.random_range(-jitter..=jitter);
        let radius = match object.size {
            Size::Small => 0.2 * cell,
            Size::Large => 0.36 * cell,
        };
        draw(&mut image, object, cx, cy, radius.max(1.5));
    }
    image
}

fn draw(image: &mut RgbImage, object: &Object, cx: f32, cy: f32, r: f32) {
    let color = Rgb(object.color.rgb());
    let point = |dx: f32, dy: f32| Point::new((cx + dx).round() as i32, (cy + dy).round() as i32);
    let rect = |w: f32, h: f32| {
        Rect::at((cx - w / 2.0).round() as i32, (cy - h / 2.0).round() as i32)
            .of_size(w.round().max(1.0) as u32, h.round().max(1.0) as u32)
    };
    match object.shape {
        Shape::Circle => draw_filled_circle_mut(
            image,
            (cx.round() as i32, cy.round() as i32),
            r.round() as i32,
            color,
        ),
        Shape::Square => draw_filled_rect_mut(image, rect(1.6 * r, 1.6 * r), color),
        Shape::Cross => {
            draw_filled_rect_mut(image, rect(2.0 * r, 0.6 * r), color);
            draw_filled_rect_mut(image, rect(0.6 * r, 2.0 * r), color);
        }
        Shape::Triangle => {
            let points = [
                point(0.0, -r),
                point(0.87 * r, 0.5 * r),
                point(-0.87 * r, 0.5 * r),
            ];
            polygon(image, &points, color);
        }
        Shape::Diamond => {
            let points = [
                point(0.0, -r),
                point(0.7 * r, 0.0),
                point(0.0, r),
                point(-0.7 * r, 0.0),
            ];
            polygon(image, &points, color);
        }
        Shape::Star => {
            let points: Vec<_> = (0..10)
                .map(|i| {
                    let radius = if i % 2 == 0 { r } else { 0.45 * r };
                    let angle =
                        -std::f32::consts::FRAC_PI_2 + i as f32 * std::f32::consts::PI / 5.0;
                    point(radius * angle.cos(), radius * angle.sin())
                })
                .collect();
            polygon(image, &points, color);
        }
    }
}

/// imageproc refuses a polygon whose first and last points coincide, which rounding can
/// produce on tiny images; such degenerate outlines are drawn without the duplicate.
fn polygon(image: &mut RgbImage, points: &[Point<i32>], color: Rgb<u8>) {
    let mut points = points.to_vec();
    points.dedup();
    while points.len() > 1 && points.first() == points.last() {
        points.pop();
    }
    if points.len() >= 3 {
        draw_polygon_mut(image, &points, color);
    }
}
