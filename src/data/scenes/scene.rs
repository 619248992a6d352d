//! The scene graph: 2-4 objects with distinct shapes and distinct cells of a 3x3 grid, a
//! color each (colors may repeat) and a size each (sizes may repeat), and edits of one
//! attribute of one object.

use rand::Rng;
use rand::seq::{IndexedRandom, SliceRandom};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Star,
    Cross,
    Diamond,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Color {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
    White,
    Cyan,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Size {
    Small,
    Large,
}

/// A cell of the 3x3 grid, `row * 3 + col`, row 0 at the top.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Cell(pub u8);

impl Shape {
    pub const ALL: [Shape; 6] = [
        Shape::Circle,
        Shape::Square,
        Shape::Triangle,
        Shape::Star,
        Shape::Cross,
        Shape::Diamond,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
            Shape::Cross => "cross",
            Shape::Diamond => "diamond",
        }
    }
}

impl Color {
    pub const ALL: [Color; 8] = [
        Color::Red,
        Color::Green,
        Color::Blue,
        Color::Yellow,
        Color::Purple,
        Color::Orange,
        Color::White,
        Color::Cyan,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Green => "green",
            Color::Blue => "blue",
            Color::Yellow => "yellow",
            Color::Purple => "purple",
            Color::Orange => "orange",
            Color::White => "white",
            Color::Cyan => "cyan",
        }
    }
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Color::Red => [220, 40, 40],
            Color::Green => [50, 180, 60],
            Color::Blue => [50, 90, 235],
            Color::Yellow => [235, 220, 50],
            Color::Purple => [150, 60, 205],
            Color::Orange => [245, 140, 30],
            Color::White => [240, 240, 240],
            Color::Cyan => [40, 215, 225],
        }
    }
}

impl Size {
    pub const ALL: [Size; 2] = [Size::Small, Size::Large];
    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }
}

impl Cell {
    pub const ALL: [Cell; 9] = [
        Cell(0),
        Cell(1),
        Cell(2),
        Cell(3),
        Cell(4),
        Cell(5),
        Cell(6),
        Cell(7),
        Cell(8),
    ];
    pub fn row(self) -> u8 {
        self.0 / 3
    }
    pub fn col(self) -> u8 {
        self.0 % 3
    }
    pub fn name(self) -> &'static str {
        [
            "top left",
            "top middle",
            "top right",
            "middle left",
            "center",
            "middle right",
            "bottom left",
            "bottom middle",
            "bottom right",
        ][self.0 as usize]
    }
}

/// The attributes an object has, and an edit can change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Attribute {
    Color,
    Shape,
    Size,
    Position,
}

impl Attribute {
    pub const ALL: [Attribute; 4] = [
        Attribute::Color,
        Attribute::Shape,
        Attribute::Size,
        Attribute::Position,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Attribute::Color => "color",
            Attribute::Shape => "shape",
            Attribute::Size => "size",
            Attribute::Position => "position",
        }
    }
}

/// One attribute's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Value {
    Color(Color),
    Shape(Shape),
    Size(Size),
    Position(Cell),
}

impl Value {
    /// The short answer naming this value.
    pub fn name(self) -> &'static str {
        match self {
            Value::Color(c) => c.name(),
            Value::Shape(s) => s.name(),
            Value::Size(s) => s.name(),
            Value::Position(c) => c.name(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Object {
    pub shape: Shape,
    pub color: Color,
    pub size: Size,
    pub cell: Cell,
}

impl Object {
    pub fn get(&self, attribute: Attribute) -> Value {
        match attribute {
            Attribute::Color => Value::Color(self.color),
            Attribute::Shape => Value::Shape(self.shape),
            Attribute::Size => Value::Size(self.size),
            Attribute::Position => Value::Position(self.cell),
        }
    }

    fn set(&mut self, value: Value) {
        match value {
            Value::Color(c) => self.color = c,
            Value::Shape(s) => self.shape = s,
            Value::Size(s) => self.size = s,
            Value::Position(c) => self.cell = c,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Scene {
    pub objects: Vec<Object>,
}

/// `S -> S'`: one attribute of one object gets a new value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edit {
    pub object: usize,
    pub attribute: Attribute,
    pub from: Value,
    pub to: Value,
}

impl Scene {
    pub fn random(rng: &mut impl Rng) -> Self {
        let count = rng.random_range(2..=4);
        let mut shapes = Shape::ALL.to_vec();
        shapes.shuffle(rng);
        let mut cells = Cell::ALL.to_vec();
        cells.shuffle(rng);
        let objects = (0..count)
            .map(|i| Object {
                shape: shapes[i],
                cell: cells[i],
                color: *Color::ALL.choose(rng).expect("colors"),
                size: *Size::ALL.choose(rng).expect("sizes"),
            })
            .collect();
        Self { objects }
    }

    /// Every value `attribute` of `object` could take in an edit: a different color, the
    /// other size, a shape no object has (shapes stay distinct), an empty cell (cells too).
    pub fn edit_values(&self, object: usize, attribute: Attribute) -> Vec<Value> {
        let current = self.objects[object].get(attribute);
        let taken = |v: Value| self.objects.iter().any(|o| o.get(attribute) == v);
        let candidates: Vec<Value> = match attribute {
            Attribute::Color => Color::ALL.iter().map(|&c| Value::Color(c)).collect(),
            Attribute::Size => Size::ALL.iter().map(|&s| Value::Size(s)).collect(),
            Attribute::Shape => Shape::ALL.iter().map(|&s| Value::Shape(s)).collect(),
            Attribute::Position => Cell::ALL.iter().map(|&c| Value::Position(c)).collect(),
        };
        candidates
            .into_iter()
            .filter(|&v| v != current)
            .filter(|&v| !matches!(attribute, Attribute::Shape | Attribute::Position) || !taken(v))
            .collect()
    }

    pub fn random_edit(&self, rng: &mut impl Rng) -> Edit {
        let object = rng.random_range(0..self.objects.len());
        let attribute = *Attribute::ALL.choose(rng).expect("attributes");
        let to = *self
            .edit_values(object, attribute)
            .choose(rng)
            .expect("with at most 4 of 6 shapes and 9 cells, every attribute has another value");
        Edit {
            object,
            attribute,
            from: self.objects[object].get(attribute),
            to,
        }
    }

    pub fn apply(&self, edit: &Edit) -> Scene {
        let mut edited = self.clone();
        edited.objects[edit.object].set(edit.to);
        edited
    }
}
