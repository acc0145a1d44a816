//! Axis-aligned boxes in the host's normalized coordinates.

/// A box as the WIT contract carries it: left, top, width and height, with 0.0 the left or
/// top edge of the source frame and 1.0 the right or bottom edge. Boxes may reach past the
/// frame edges (a person half out of view); nothing here clips them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BBox {
    pub left: f64,
    pub top: f64,
    pub width: f64,
    pub height: f64,
}

impl BBox {
    pub fn new(left: f64, top: f64, width: f64, height: f64) -> Self {
        Self {
            left,
            top,
            width,
            height,
        }
    }

    /// Builds a box from its centre and size.
    pub fn from_centre(cx: f64, cy: f64, width: f64, height: f64) -> Self {
        Self::new(cx - width / 2.0, cy - height / 2.0, width, height)
    }

    pub fn centre(&self) -> (f64, f64) {
        (self.left + self.width / 2.0, self.top + self.height / 2.0)
    }

    pub fn area(&self) -> f64 {
        self.width.max(0.0) * self.height.max(0.0)
    }

    /// Intersection over union, in `[0, 1]`; 0 when either box is empty.
    pub fn iou(&self, other: &BBox) -> f64 {
        let ix = (self.left + self.width).min(other.left + other.width) - self.left.max(other.left);
        let iy = (self.top + self.height).min(other.top + other.height) - self.top.max(other.top);
        if ix <= 0.0 || iy <= 0.0 {
            return 0.0;
        }

        let inter = ix * iy;
        let union = self.area() + other.area() - inter;
        if union <= 0.0 { 0.0 } else { inter / union }
    }

    /// True when every field is finite and the box has a positive size.
    pub fn is_valid(&self) -> bool {
        [self.left, self.top, self.width, self.height]
            .iter()
            .all(|v| v.is_finite())
            && self.width > 0.0
            && self.height > 0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iou_of_identical_boxes_is_one() {
        let b = BBox::new(0.1, 0.2, 0.3, 0.4);
        assert!((b.iou(&b) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn iou_of_disjoint_or_touching_boxes_is_zero() {
        let a = BBox::new(0.0, 0.0, 0.1, 0.1);
        assert_eq!(a.iou(&BBox::new(0.5, 0.5, 0.1, 0.1)), 0.0);
        assert_eq!(a.iou(&BBox::new(0.1, 0.0, 0.1, 0.1)), 0.0);
    }

    #[test]
    fn iou_of_half_overlap() {
        // Two unit squares shifted by half: intersection 0.5, union 1.5.
        let a = BBox::new(0.0, 0.0, 1.0, 1.0);
        let b = BBox::new(0.5, 0.0, 1.0, 1.0);
        assert!((a.iou(&b) - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn centre_round_trips() {
        let b = BBox::new(0.1, 0.2, 0.3, 0.4);
        let (cx, cy) = b.centre();
        let back = BBox::from_centre(cx, cy, b.width, b.height);
        assert!((back.left - b.left).abs() < 1e-12 && (back.top - b.top).abs() < 1e-12);
    }

    #[test]
    fn empty_or_non_finite_boxes_are_invalid() {
        assert!(!BBox::new(0.0, 0.0, 0.0, 0.1).is_valid());
        assert!(!BBox::new(f64::NAN, 0.0, 0.1, 0.1).is_valid());
        assert!(BBox::new(-0.1, 0.9, 0.2, 0.2).is_valid());
    }
}
