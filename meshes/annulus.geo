// Annulus 1/2 <= |a| <= 1, area 3 pi / 4 (wpgflow [actions] domain = "annulus"; scaled by actions.scale, moved
// by actions.center). Regenerate the XDMF meshes with `make meshes`; h is the target edge length
// (set by meshes/generate.py).
DefineConstant[ h = {0.1, Name "h"} ];
Point(1) = {0, 0, 0, h};
Point(2) = {1, 0, 0, h};
Point(3) = {0, 1, 0, h};
Point(4) = {-1, 0, 0, h};
Point(5) = {0, -1, 0, h};
Point(6) = {0.5, 0, 0, h};
Point(7) = {0, 0.5, 0, h};
Point(8) = {-0.5, 0, 0, h};
Point(9) = {0, -0.5, 0, h};
Circle(1) = {2, 1, 3};
Circle(2) = {3, 1, 4};
Circle(3) = {4, 1, 5};
Circle(4) = {5, 1, 2};
Circle(5) = {6, 1, 7};
Circle(6) = {7, 1, 8};
Circle(7) = {8, 1, 9};
Circle(8) = {9, 1, 6};
Curve Loop(1) = {1, 2, 3, 4};
Curve Loop(2) = {5, 6, 7, 8};
Plane Surface(1) = {1, 2};
Physical Surface(1) = {1};
Mesh.Algorithm = 5;  // Delaunay
