//! A desktop window showing the screens, for development (`--features simulator`, needs SDL2).

use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::*;
use embedded_graphics_simulator::{
    OutputSettingsBuilder, SimulatorDisplay, SimulatorEvent, Window,
};

use crate::Canvas;

pub struct SimulatorWindow {
    display: SimulatorDisplay<Rgb888>,
    window: Window,
}

impl SimulatorWindow {
    pub fn new(width: u32, height: u32, scale: u32) -> Self {
        let settings = OutputSettingsBuilder::new().scale(scale.max(1)).build();
        Self {
            display: SimulatorDisplay::new(Size::new(width, height)),
            window: Window::new("dermedge", &settings),
        }
    }

    /// Show `canvas`; returns false once the window was closed.
    pub fn present(&mut self, canvas: &Canvas) -> bool {
        let pixels = (0..canvas.height()).flat_map(|y| {
            (0..canvas.width())
                .map(move |x| Pixel(Point::new(x as i32, y as i32), canvas.pixel(x, y)))
        });
        let _ = self.display.draw_iter(pixels);
        self.window.update(&self.display);
        !self.window.events().any(|e| e == SimulatorEvent::Quit)
    }
}
