//! Referring expressions, question families with paraphrase templates, and their answers on
//! a scene. A question is *well-posed* on a scene when its referring expression picks out
//! exactly one object.

use rand::Rng;
use rand::seq::IndexedRandom;
use serde::Serialize;

use super::scene::{Attribute, Color, Scene, Shape, Size, Value};

/// How a referring expression names an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefKind {
    Shape,
    Color,
    Position,
    Size,
}

impl RefKind {
    pub const ALL: [RefKind; 4] = [
        RefKind::Shape,
        RefKind::Color,
        RefKind::Position,
        RefKind::Size,
    ];

    /// The attribute this kind of expression names the object by.
    pub fn attribute(self) -> Attribute {
        match self {
            RefKind::Shape => Attribute::Shape,
            RefKind::Color => Attribute::Color,
            RefKind::Position => Attribute::Position,
            RefKind::Size => Attribute::Size,
        }
    }
}

/// A referring expression: "the circle", "the red shape", "the shape in the top left",
/// "the large shape". Its value is one of the referred object's attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ref(pub Value);

impl Ref {
    pub fn of(kind: RefKind, scene: &Scene, object: usize) -> Self {
        Ref(scene.objects[object].get(kind.attribute()))
    }

    pub fn kind(self) -> RefKind {
        match self.0 {
            Value::Shape(_) => RefKind::Shape,
            Value::Color(_) => RefKind::Color,
            Value::Position(_) => RefKind::Position,
            Value::Size(_) => RefKind::Size,
        }
    }

    pub fn phrase(self) -> String {
        match self.0 {
            Value::Shape(s) => format!("the {}", s.name()),
            Value::Color(c) => format!("the {} shape", c.name()),
            Value::Position(c) => format!("the shape in the {}", c.name()),
            Value::Size(s) => format!("the {} shape", s.name()),
        }
    }

    /// The one object this expression denotes in `scene`, if exactly one matches.
    pub fn resolve(self, scene: &Scene) -> Option<usize> {
        let attribute = self.kind().attribute();
        let mut matches = scene
            .objects
            .iter()
            .enumerate()
            .filter(|(_, o)| o.get(attribute) == self.0)
            .map(|(i, _)| i);
        let first = matches.next()?;
        matches.next().is_none().then_some(first)
    }
}

/// What a question asks, independent of its wording.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Query {
    /// An attribute of a referred object ("what color is the circle?").
    Attribute(Attribute, Ref),
    /// "is there a red circle?"
    Exists(Color, Shape),
    /// "how many red shapes are there?"
    CountColor(Color),
    /// "how many large shapes are there?"
    CountSize(Size),
    /// "how many shapes are there?"
    CountAll,
}

/// The question family, for paraphrase templates and for statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Color,
    Shape,
    Size,
    Position,
    Exists,
    Count,
}

/// The answers of count questions, from zero up.
pub const NUMBERS: [&str; 5] = ["zero", "one", "two", "three", "four"];

impl Query {
    pub fn family(self) -> Family {
        match self {
            Query::Attribute(Attribute::Color, _) => Family::Color,
            Query::Attribute(Attribute::Shape, _) => Family::Shape,
            Query::Attribute(Attribute::Size, _) => Family::Size,
            Query::Attribute(Attribute::Position, _) => Family::Position,
            Query::Exists(..) => Family::Exists,
            Query::CountColor(_) | Query::CountSize(_) | Query::CountAll => Family::Count,
        }
    }

    /// The referring expression, for attribute questions.
    pub fn reference(self) -> Option<Ref> {
        match self {
            Query::Attribute(_, r) => Some(r),
            _ => None,
        }
    }

    /// The cells (reading order) of the objects a count or existence question picks out on
    /// `scene` (possibly none); `None` for attribute questions, whose one object is their
    /// reference's.
    pub fn matches(self, scene: &Scene) -> Option<Vec<u8>> {
        let cells = |f: &dyn Fn(&super::scene::Object) -> bool| {
            let mut cells: Vec<u8> = scene
                .objects
                .iter()
                .filter(|o| f(o))
                .map(|o| o.cell.0)
                .collect();
            cells.sort();
            Some(cells)
        };
        match self {
            Query::Attribute(..) => None,
            Query::Exists(color, shape) => cells(&|o| o.color == color && o.shape == shape),
            Query::CountColor(c) => cells(&|o| o.color == c),
            Query::CountSize(s) => cells(&|o| o.size == s),
            Query::CountAll => cells(&|_| true),
        }
    }

    /// The short answer on `scene`, or `None` when the question is ill-posed there.
    pub fn answer(self, scene: &Scene) -> Option<String> {
        let count = |f: &dyn Fn(&super::scene::Object) -> bool| {
            NUMBERS[scene.objects.iter().filter(|o| f(o)).count()].to_string()
        };
        match self {
            Query::Attribute(attribute, r) => {
                let object = r.resolve(scene)?;
                Some(scene.objects[object].get(attribute).name().to_string())
            }
            Query::Exists(color, shape) => {
                let yes = scene
                    .objects
                    .iter()
                    .any(|o| o.color == color && o.shape == shape);
                Some(if yes { "yes" } else { "no" }.to_string())
            }
            Query::CountColor(c) => Some(count(&|o| o.color == c)),
            Query::CountSize(s) => Some(count(&|o| o.size == s)),
            Query::CountAll => Some(count(&|_| true)),
        }
    }

    /// The question in paraphrase template `template` (taken modulo the family's count).
    pub fn text(self, template: usize) -> String {
        let pick = |options: [&str; 3]| options[template % 3].to_string();
        match self {
            Query::Attribute(attribute, r) => {
                let templates = match attribute {
                    Attribute::Color => [
                        "what color is {}?",
                        "which color does {} have?",
                        "what is the color of {}?",
                    ],
                    Attribute::Shape => [
                        "what shape is {}?",
                        "which shape is {}?",
                        "what kind of shape is {}?",
                    ],
                    Attribute::Size => [
                        "what size is {}?",
                        "how big is {}?",
                        "is {} small or large?",
                    ],
                    Attribute::Position => [
                        "where is {}?",
                        "in which part of the image is {}?",
                        "where in the picture is {}?",
                    ],
                };
                pick(templates).replace("{}", &r.phrase())
            }
            Query::Exists(c, s) => pick([
                "is there a {} {}?",
                "does the image contain a {} {}?",
                "can you see a {} {}?",
            ])
            .replacen("{}", c.name(), 1)
            .replacen("{}", s.name(), 1),
            Query::CountColor(c) => pick([
                "how many {} shapes are there?",
                "what is the number of {} shapes?",
                "count the {} shapes.",
            ])
            .replace("{}", c.name()),
            Query::CountSize(s) => pick([
                "how many {} shapes are there?",
                "what is the number of {} shapes?",
                "count the {} shapes.",
            ])
            .replace("{}", s.name()),
            Query::CountAll => pick([
                "how many shapes are there?",
                "what is the number of shapes?",
                "count the shapes.",
            ]),
        }
    }

    /// A random paraphrase.
    pub fn random_text(self, rng: &mut impl Rng) -> String {
        self.text(rng.random_range(0..3))
    }
}

/// Every question that can be asked about `scenes` (attribute questions through every
/// resolving expression, existence of each object's color and shape and of a few absent
/// combinations, and counts), without duplicates, in a fixed order.
pub fn all_queries(scenes: &[&Scene]) -> Vec<Query> {
    let mut queries = std::collections::BTreeSet::new();
    for scene in scenes {
        for object in 0..scene.objects.len() {
            for kind in RefKind::ALL {
                let r = Ref::of(kind, scene, object);
                if r.resolve(scene).is_none() {
                    continue;
                }
                for attribute in Attribute::ALL {
                    if attribute != kind.attribute() {
                        queries.insert(Query::Attribute(attribute, r));
                    }
                }
            }
            let o = scene.objects[object];
            queries.insert(Query::Exists(o.color, o.shape));
            queries.insert(Query::CountColor(o.color));
            queries.insert(Query::CountSize(o.size));
        }
    }
    queries.insert(Query::CountAll);
    queries.into_iter().collect()
}

/// An absent color-shape combination for an existence question with answer "no".
pub fn absent_combination(scene: &Scene, rng: &mut impl Rng) -> Query {
    loop {
        let color = *Color::ALL.choose(rng).expect("colors");
        let shape = *Shape::ALL.choose(rng).expect("shapes");
        if !scene
            .objects
            .iter()
            .any(|o| o.color == color && o.shape == shape)
        {
            return Query::Exists(color, shape);
        }
    }
}

/// A one-sentence caption: "a large red circle in the top left, a small blue square in the
/// center and a ...", objects in reading order.
pub fn caption(scene: &Scene) -> String {
    let mut objects = scene.objects.clone();
    objects.sort_by_key(|o| o.cell);
    let parts: Vec<String> = objects
        .iter()
        .map(|o| {
            format!(
                "a {} {} {} in the {}",
                o.size.name(),
                o.color.name(),
                o.shape.name(),
                o.cell.name()
            )
        })
        .collect();
    match parts.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {}", rest.join(", "), last),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::scenes::scene::{Cell, Object};

    #[test]
    fn count_and_existence_questions_match_the_cells_of_what_they_pick_out() {
        let object = |shape, color, size, cell| Object {
            shape,
            color,
            size,
            cell: Cell(cell),
        };
        let scene = Scene {
            objects: vec![
                object(Shape::Circle, Color::Red, Size::Small, 4),
                object(Shape::Square, Color::Red, Size::Large, 0),
                object(Shape::Circle, Color::Blue, Size::Large, 8),
            ],
        };
        assert_eq!(
            Query::CountColor(Color::Red).matches(&scene),
            Some(vec![0, 4])
        );
        assert_eq!(
            Query::CountSize(Size::Large).matches(&scene),
            Some(vec![0, 8])
        );
        assert_eq!(Query::CountAll.matches(&scene), Some(vec![0, 4, 8]));
        assert_eq!(
            Query::Exists(Color::Blue, Shape::Circle).matches(&scene),
            Some(vec![8])
        );
        assert_eq!(
            Query::Exists(Color::Blue, Shape::Square).matches(&scene),
            Some(vec![])
        );
        let r = Ref(Value::Color(Color::Blue));
        assert_eq!(Query::Attribute(Attribute::Shape, r).matches(&scene), None);
        assert_eq!(
            Query::CountColor(Color::Red).answer(&scene).as_deref(),
            Some("two")
        );
    }
}
